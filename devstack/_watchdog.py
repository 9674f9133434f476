"""Kills a devstack instance's processes when the Python process that owns it dies.

    python3 -m devstack._watchdog <owner_pid> <KEY=value marker> [<pid file>]

Started by :class:`devstack.slurm.SlurmCluster` (and stopped by its ``stop()``), so a test run that
is killed (SIGKILL, a crashed interpreter) does not leave Slurm daemons behind on the machine.
The watchdog does not carry the marker itself. With a pid file (``devstack._service``: Redis,
PostgreSQL, nginx, the OTLP collector) it also kills that pid's process tree, paused or not.
"""

from __future__ import annotations

import sys
import time

from ._proc import kill_marked, pid_alive


def main(argv: list[str]) -> int:
    owner, marker = int(argv[0]), argv[1]
    while pid_alive(owner):
        time.sleep(1.0)
    if len(argv) > 2:
        from pathlib import Path

        from ._service import reap

        reap(marker, Path(argv[2]))
        return 0
    kill_marked(marker, grace=5)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
