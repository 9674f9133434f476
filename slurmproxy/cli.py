"""Command line: ``slurmproxy serve | check-config | version``.

``serve`` validates the configuration, the policy and the Slurm credential *before* binding a
port; any problem is printed with the file and field at fault, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from slurmproxy import __version__
from slurmproxy.credentials import CredentialError, credentials_from
from slurmproxy.policy import PolicyError
from slurmproxy.runtime import load_runtime_policy
from slurmproxy.settings import ConfigError, Settings, load_settings

EXIT_CONFIG = 2


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", type=Path, default=os.environ.get("SLURMPROXY_CONFIG"), help="YAML configuration file"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slurmproxy", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    _config_arg(serve)
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--workers", type=int, help="override server.workers")
    check = sub.add_parser("check-config", help="validate the configuration and policy files, then exit")
    _config_arg(check)
    sub.add_parser("version", help="print the version")
    return parser


def validate(config: Path | None) -> Settings:
    """Everything serve needs, checked; raises ConfigError/PolicyError/CredentialError."""
    settings = load_settings(config)
    load_runtime_policy(settings)
    credentials_from(settings.upstream)
    return settings


def _validated(config: Path | None) -> Settings | None:
    try:
        return validate(config)
    except (ConfigError, PolicyError) as exc:
        print(f"slurmproxy: invalid configuration\n{exc.detail}", file=sys.stderr)
    except CredentialError as exc:
        print(f"slurmproxy: invalid configuration\n{exc}", file=sys.stderr)
    return None


def serve(args: argparse.Namespace) -> int:
    settings = _validated(args.config)
    if settings is None:
        return EXIT_CONFIG
    import uvicorn

    from slurmproxy.logs import configure_logging

    configure_logging(settings.log)
    if args.config is not None:
        os.environ["SLURMPROXY_CONFIG"] = str(args.config.resolve())
    uvicorn.run(
        "slurmproxy.app:create_app",
        factory=True,
        host=args.host or settings.server.host,
        port=args.port if args.port is not None else settings.server.port,
        workers=args.workers or settings.server.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        server_header=False,
        proxy_headers=False,
        log_config=None,
        timeout_graceful_shutdown=30,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    if args.command == "check-config":
        settings = _validated(args.config)
        if settings is None:
            return EXIT_CONFIG
        print(
            f"configuration OK: {len(settings.oidc.issuers)} issuer(s), policy from "
            f"{', '.join(str(p) for p in settings.policy.paths)}"
        )
        return 0
    return serve(args)
