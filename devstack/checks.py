"""Offline checkers for files the project ships: Prometheus rules (promtool) and systemd units.

* ``promtool`` comes from Debian's ``prometheus`` package (2.42; ``devstack/setup.sh --promtool``
  installs it without starting the server).
* ``systemd-analyze`` (systemd 252) works here without a running systemd: ``verify`` on a unit
  file anywhere on disk, and ``security --offline=true`` for the exposure score. Both print
  their findings on stderr; ``verify`` exits non-zero only for fatal errors (an ExecStart that is
  not an absolute path or does not exist, a missing ``Requires=`` unit). An unknown key or an
  unparsable value is a warning with exit 0, so ``verify_unit`` returns the warnings for tests
  to assert on.

Stdlib only.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ._proc import DevstackError, run


def _tool(name: str, flag: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise DevstackError(f"{name} is not installed: run devstack/setup.sh {flag}")
    return path


def promtool_check_rules(*paths: Path) -> str:
    """``promtool check rules <paths>``; DevstackError (with promtool's findings) if any file fails."""
    return run([_tool("promtool", "--promtool"), "check", "rules", *map(str, paths)], timeout=60).stdout


def promtool_test_rules(*paths: Path) -> str:
    """``promtool test rules <test files>`` (unit tests of alerting and recording rules)."""
    return run([_tool("promtool", "--promtool"), "test", "rules", *map(str, paths)], timeout=120).stdout


def verify_unit(unit: Path) -> list[str]:
    """``systemd-analyze verify <unit>``: its warnings (stderr lines); DevstackError on a fatal error."""
    proc = run([_tool("systemd-analyze", "(systemd is part of Debian)"), "verify", "--man=no", str(unit)], check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode != 0:
        raise DevstackError(f"systemd-analyze verify {unit} exited {proc.returncode}:\n" + "\n".join(lines))
    return lines


_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def unit_exposure(unit: Path) -> float:
    """The exposure score (0 = most locked down, 10 = unsafe) of ``systemd-analyze security --offline=true``."""
    proc = run(
        [
            _tool("systemd-analyze", "(systemd is part of Debian)"),
            "security",
            "--offline=true",
            "--no-pager",
            str(unit),
        ],
        check=False,
    )
    match = _EXPOSURE.search(proc.stdout)
    if match is None:
        raise DevstackError(
            f"no exposure score from systemd-analyze security:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return float(match.group(1))
