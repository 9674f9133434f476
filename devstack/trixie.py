"""``python3 -m devstack.trixie build|check|path``: the Slurm 24.11 chroot (kept for old callers).

The builder is :mod:`devstack.chroot`, one for every chroot generation; this name only runs it
for ``"24.11"``.
"""

from __future__ import annotations

import sys

from .chroot import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:2], default=("24.11",)))
