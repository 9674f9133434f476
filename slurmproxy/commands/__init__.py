"""Subcommands of the ``slurmproxy`` CLI. Each module exposes ``register(subparsers)``; the parser
stores the function to run as ``args.run`` (returning the exit status)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        type=Path,
        default=os.environ.get("SLURMPROXY_CONFIG"),
        help="YAML configuration file (default: $SLURMPROXY_CONFIG)",
    )
