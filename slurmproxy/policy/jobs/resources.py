"""Reading the resource values of a job description: node counts, host lists, array specifications,
trackable-resource (TRES/GRES) strings and memory sizes, as Slurm writes them.

Each parser returns what it read or raises :class:`Uncountable` with the reason; the caller
decides whether that matters (it does under a rule that limits the resource). They are strict on
purpose: a form the proxy cannot read is refused under a limit rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from slurmproxy.policy.limits import slurm_megabytes

MAX_ITEMS = 1024
"""Most comma-separated parts read from one value (a longer one is uncountable)."""
_COUNT = re.compile(r"[0-9]{1,9}")
_NODE_RANGE = re.compile(r"(?P<low>[0-9]{1,9})(?:-(?P<high>[0-9]{1,9}))?")
_ARRAY_PART = re.compile(r"(?P<low>[0-9]{1,9})(?:-(?P<high>[0-9]{1,9})(?::(?P<step>[0-9]{1,9}))?)?")
_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_HOST_CHARS = re.compile(r"[A-Za-z0-9._-]*")
_TRES_NAME = re.compile(r"[a-z][a-z0-9_]*(?:/[A-Za-z0-9_.-]+)?")
_NOT_GRES = frozenset({"mem", "node", "billing", "energy", "fs", "ic", "vmem", "pages"})
_KIND = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class Uncountable(ValueError):
    """The value is valid for slurmrestd, perhaps, but not in a form the proxy can count."""


def _parts(text: str) -> list[str]:
    parts = text.split(",")
    if len(parts) > MAX_ITEMS or any(not part for part in parts):
        raise Uncountable(f"{text!r} is not a list the proxy can read")
    return parts


def node_counts(value: Any) -> list[int]:
    """The node counts a ``nodes`` value names: ``"2"``, ``"1-4"``, ``"1,4,8"`` (data_parser), ``[1, 4]``
    (v0.0.38) or a plain integer. Each must be at least 1."""
    if isinstance(value, list):
        counts = value
    elif isinstance(value, int) and not isinstance(value, bool):
        counts = [value]
    elif isinstance(value, str):
        counts = []
        for part in _parts(value.strip()):
            match = _NODE_RANGE.fullmatch(part)
            if match is None:
                raise Uncountable(f"{value!r} is not a node count such as 2, 1-4 or 1,4,8")
            counts.extend(int(n) for n in match.group("low", "high") if n is not None)
    else:
        raise Uncountable(f"{value!r} is not a node count")
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts):
        raise Uncountable(f"{value!r} is not a node count of at least 1")
    return counts


def host_count(value: Any) -> int:
    """How many hosts a node list names: ``["n1", "n[2-4]"]`` or ``"n1,n[2-4]"`` is 4.

    Brackets expand as Slurm's host lists do (``n[1-3,7]``, ``r[1-2]n[1-2]``). Duplicates count once
    each time they are written (Slurm would merge them; counting more never lets a job through).
    """
    items = value if isinstance(value, list) else [value]
    total = 0
    for item in items:
        if not isinstance(item, str):
            raise Uncountable(f"{item!r} is not a host name")
        for host in _split_hosts(item):
            total += _expand(host)
            if total > 10**6:
                raise Uncountable("the node list names too many hosts")
    return total


def _split_hosts(text: str) -> list[str]:
    """``"a,b[1,3],c"`` → ``["a", "b[1,3]", "c"]`` (commas inside brackets do not separate hosts)."""
    out, depth, current = [], 0, ""
    for char in text.strip():
        depth += char == "["
        depth -= char == "]"
        if depth < 0 or depth > 1:
            raise Uncountable(f"{text!r} is not a host list")
        if char == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += char
    out.append(current)
    if depth or len(out) > MAX_ITEMS or any(not host for host in out):
        raise Uncountable(f"{text!r} is not a host list")
    return out


def _expand(host: str) -> int:
    count = 1
    for match in _BRACKET.finditer(host):
        inside = 0
        for part in _parts(match.group(1)):
            numbers = _NODE_RANGE.fullmatch(part.strip())
            if numbers is None:
                raise Uncountable(f"{host!r} is not a host list")
            low, high = int(numbers["low"]), int(numbers["high"] or numbers["low"])
            if high < low:
                raise Uncountable(f"{host!r} has a range that runs backwards")
            inside += high - low + 1
        count *= inside
    if not _HOST_CHARS.fullmatch(_BRACKET.sub("", host)):
        raise Uncountable(f"{host!r} is not a host name")
    return count


@dataclass(frozen=True)
class ArraySpec:
    tasks: int
    at_once: int


def array_spec(value: str) -> ArraySpec:
    """``"0-99"``, ``"1,3,5-9:2"``, ``"0-99999%10"``: how many tasks, and how many may run at once."""
    text, _, throttle = value.strip().partition("%")
    if throttle and not _COUNT.fullmatch(throttle):
        raise Uncountable(f"{value!r}: the part after % must be a number")
    tasks = 0
    for part in _parts(text):
        match = _ARRAY_PART.fullmatch(part)
        if match is None:
            raise Uncountable(f"{value!r} is not an array specification such as 0-99%10")
        low = int(match["low"])
        high = int(match["high"] or low)
        step = int(match["step"] or 1)
        if high < low or step < 1:
            raise Uncountable(f"{value!r} has an empty range")
        tasks += (high - low) // step + 1
    at_once = min(tasks, int(throttle)) if throttle and int(throttle) > 0 else tasks
    return ArraySpec(tasks, at_once)


@dataclass(frozen=True)
class Tres:
    name: str  # "gres/gpu", "gpu", "cpu", "gres/mps", "license/x"
    count: int

    @property
    def is_gpu(self) -> bool:
        return self.name in ("gpu", "gres/gpu")


def tres_list(value: str) -> list[Tres]:
    """``"gres/gpu:a100:2,cpu=4"`` → [gres/gpu 2, cpu 4]; a missing count is 1 (``"gres/gpu"``)."""
    out: list[Tres] = []
    for part in _parts(value.strip()):
        name, *rest = re.split(r"[:=]", part)
        count = int(rest.pop()) if rest and rest[-1].isdigit() else 1
        if not _TRES_NAME.fullmatch(name) or len(rest) > 1 or not all(_KIND.fullmatch(r) for r in rest):
            raise Uncountable(f"{value!r} is not a trackable-resource list such as gres/gpu:2")
        out.append(Tres(name, count))
    return out


def gpus_in(value: str) -> int:
    """The GPUs a ``tres_per_*`` (``"gres/gpu:2"``) or v0.0.38 ``gres`` (``"gpu:2,mps:100"``) string asks
    for. Other generic resources (``mps``, ``shard``) are not GPUs; ``cpu`` is counted elsewhere;
    anything else (licenses, ``mem``, …) is uncountable."""
    total = 0
    for tres in tres_list(value):
        known = tres.name == "cpu" or tres.name.startswith("gres/") or "/" not in tres.name
        if tres.is_gpu:
            total += tres.count
        elif not known or tres.name in _NOT_GRES:
            raise Uncountable(f"{value!r} names {tres.name}, which the proxy does not count")
    return total


def gpu_count(value: str) -> int:
    """v0.0.38's ``gpus``/``gpus_per_*``: ``"2"``, ``"a100:2"``, ``"a100:2,v100:1"``."""
    total = 0
    for part in _parts(value.strip()):
        *kinds, count = part.split(":")
        if len(kinds) > 1 or not _COUNT.fullmatch(count) or not all(_KIND.fullmatch(k) for k in kinds):
            raise Uncountable(f"{value!r} is not a GPU count such as 2 or a100:2")
        total += int(count)
    return total


def cpus_in(value: str) -> int:
    """The CPUs a ``tres_per_task`` string asks for per task (``cpu=4``, ``cpu:4``); 0 if none."""
    return sum(t.count for t in tres_list(value) if t.name == "cpu")


def per_gpu(value: str) -> int:
    """``cpus_per_tres``/``memory_per_tres`` (``"gres/gpu:4"``) as an amount per GPU; other resources refuse."""
    amounts = {}
    for part in _parts(value.strip()):
        name, _, amount = part.rpartition(":")
        if name not in ("gres/gpu", "gpu"):
            raise Uncountable(f"{value!r}: only gres/gpu:N is counted")
        amounts[name] = megabytes(amount)
    return max(amounts.values(), default=0)


def megabytes(value: Any) -> int:
    """A memory size in MB: an integer (MB, as Slurm's API takes it) or ``"512M"``, ``"16G"``, ``"1T"``."""
    try:
        return slurm_megabytes(value if isinstance(value, int) else str(value))
    except ValueError as exc:
        raise Uncountable(str(exc)) from exc


def no_val_number(value: Any) -> int | None:
    """The number in Slurm's ``{set, infinite, number}`` (or a plain integer); None when not set.

    ``infinite`` is :class:`Uncountable`: it is no limit at all."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if value.get("infinite", False):
        raise Uncountable("infinite")
    if not value.get("set", "number" in value) or "number" not in value:
        return None
    number: int = value["number"]
    return number
