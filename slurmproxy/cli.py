"""The ``slurmproxy`` command line. Subcommands live in ``slurmproxy.commands``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from slurmproxy import __version__
from slurmproxy.commands import EXIT_CONFIG, EXIT_OK, audit, mapping, policy, serve

__all__ = ["EXIT_CONFIG", "build_parser", "main"]

# One line per subcommand module; each adds its parsers.
COMMANDS = [serve, mapping, policy, audit]


def _version(args: argparse.Namespace) -> int:
    print(__version__)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slurmproxy", description="OAuth/OIDC authorization proxy for slurmrestd")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    sub.add_parser("version", help="print the version").set_defaults(run=_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status
