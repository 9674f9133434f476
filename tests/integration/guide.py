"""The doc-test runner of docs/guide.md: the guide's blocks, in order, with the harness's paths.

What it collects from the Markdown (fenced blocks, by their info string):

* ```` ```console ````: lines ``$ command`` run with bash; the lines after a command, up to the next
  ``$``, are the output it must print: exactly, except that a line ``...`` stands for any number
  of lines and ``…`` inside a line for any text. Each command must exit 0, or the status that
  ``exit=N`` in the info string names (```` ```console exit=2 ````, for an example of an error);
* ```` ```sh ````: a script run with bash, which must exit 0 (its output is not checked);
* ```` ```yaml file=PATH ```` (any language): the block's text is written to PATH;
* ``<!-- guide-runner: serve … -->``: start the proxy as the systemd unit would (``serve`` with the
  config the guide wrote, the keys in a credentials directory), and wait until it answers.

A block whose info string has the word ``site:`` (with its reason after it) needs a real site: a
provider registration, a package install, a booted systemd. The runner does not collect it at all;
:func:`site_blocks` lists them so a test can check each gives its reason.

Every path, URL and port the guide shows is replaced by the harness's (:class:`Substitutions`), in
commands, files and expected output alike, so the guide reads as an admin's and runs as a test's.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```\s*$", re.MULTILINE | re.DOTALL)
DIRECTIVE = re.compile(r"^<!-- guide-runner: (?P<action>\w+)(?P<rest>[^>]*)-->\s*$", re.MULTILINE)
COMMAND_TIMEOUT = 120.0  # seconds per command: far above any command in the guide


@dataclass
class Block:
    """One thing to do, in guide order: ``console``, ``script``, ``file`` or ``serve``."""

    kind: str
    line: int
    text: str = ""
    path: str = ""
    info: str = ""


@dataclass
class Substitutions:
    """The guide's site values and the harness's, applied longest first."""

    pairs: dict[str, str] = field(default_factory=dict)

    def __call__(self, text: str) -> str:
        for old in sorted(self.pairs, key=len, reverse=True):
            text = text.replace(old, self.pairs[old])
        return text


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _items(markdown: str) -> Iterator[tuple[int, str, str, str]]:
    """(offset, "fence" or "directive", info or action, body) in document order."""
    found = [(m.start(), "fence", m.group("info").strip(), m.group("body")) for m in FENCE.finditer(markdown)]
    found += [(m.start(), "directive", m.group("action"), m.group("rest")) for m in DIRECTIVE.finditer(markdown)]
    yield from sorted(found)


def is_site(info: str) -> bool:
    return "site:" in info.split(None, 1)[-1] if " " in info else False


def blocks(markdown: str) -> list[Block]:
    """What the runner does, in order. Site blocks and plain examples (``json``, ``text``...) are not
    collected; a fenced block in a language the runner does not run and without ``file=`` is prose."""
    out: list[Block] = []
    for offset, kind, info, body in _items(markdown):
        line = _line_of(markdown, offset)
        if kind == "directive":
            out.append(Block(info, line, info=body.strip()))
            continue
        if is_site(info):
            continue
        words = info.split()
        target = next((w.split("=", 1)[1] for w in words if w.startswith("file=")), "")
        if target:
            out.append(Block("file", line, body, target, info))
        elif words[:1] == ["console"]:
            out.append(Block("console", line, body, info=info))
        elif words[:1] == ["sh"]:
            out.append(Block("script", line, body, info=info))
    return out


def site_blocks(markdown: str) -> list[tuple[int, str]]:
    """(line, reason) of every block the runner leaves to a real site."""
    out = []
    for offset, kind, info, _ in _items(markdown):
        if kind == "fence" and is_site(info):
            out.append((_line_of(markdown, offset), info.split("site:", 1)[1].strip()))
    return out


def commands(console: str) -> list[tuple[str, list[str]]]:
    """``$ command`` lines of a console block, each with the output lines shown after it."""
    out: list[tuple[str, list[str]]] = []
    for line in console.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"console block starts with output, not a '$ ' command: {line!r}")
    return out


def _line_matches(expected: str, actual: str) -> bool:
    if "…" not in expected:
        return expected.rstrip() == actual.rstrip()
    pattern = ".*".join(re.escape(part) for part in expected.rstrip().split("…"))
    return re.fullmatch(pattern, actual.rstrip()) is not None


def _match(expected: list[str], actual: list[str]) -> bool:
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(_match(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and _line_matches(expected[0], actual[0]) and _match(expected[1:], actual[1:])


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """Whether ``actual`` lines are ``expected``, with ``...`` lines matching any number of lines.
    A command shown without output is checked by its exit status only."""
    while expected and not expected[-1].strip():
        expected = expected[:-1]
    while actual and not actual[-1].strip():
        actual = actual[:-1]
    return not expected or _match(expected, actual)


@dataclass
class Shell:
    """Runs the guide's commands with bash, in ``cwd``, with ``env``; collects a transcript for failures."""

    cwd: Path
    env: dict[str, str]
    transcript: list[str] = field(default_factory=list)

    def run(self, command: str, *, check_status: bool = True) -> tuple[int, str]:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        output = proc.stdout + proc.stderr
        self.transcript.append(f"$ {command}\n{output}(exit {proc.returncode})")
        return proc.returncode, output


def base_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without the proxy's own variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURMPROXY_")}
    env.update(extra)
    return env
