"""``slurmproxy serve`` and ``slurmproxy check-config``.

Both validate the configuration, the policy and the Slurm credential before anything else; any
problem is printed with the file and field at fault, and the exit status is 2. ``serve`` binds
its port only after that.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from slurmproxy.audit.record import read_pseudonym_key
from slurmproxy.commands import EXIT_CONFIG, EXIT_OK, add_config_argument
from slurmproxy.config.settings import Settings, load_settings, plain_http_refusal, unresolved_credentials
from slurmproxy.config.warnings import config_warnings
from slurmproxy.errors import ConfigError
from slurmproxy.identity import check_identity_config
from slurmproxy.pipeline.runtime import load_runtime_policy
from slurmproxy.state import check_state_config
from slurmproxy.tokens.claims import read_client_secrets
from slurmproxy.upstream.credentials import credentials_from


def validate(config: Path | None) -> tuple[Settings, list[str]]:
    """Everything serve needs, checked, and the warnings about what is legal but probably unsafe (the
    configuration's, then the policy's); raises ConfigError (PolicyError and CredentialError among them)."""
    settings = load_settings(config)
    unresolved = unresolved_credentials(settings)
    if unresolved:
        raise ConfigError(
            f"{', '.join(unresolved)}: named in $CREDENTIALS_DIRECTORY, which is not set. systemd sets it for a "
            "service with LoadCredential=; to check by hand, set it to a directory holding those files"
        )
    policy = load_runtime_policy(settings)
    credentials_from(settings.upstream)
    check_identity_config(settings.identity)
    check_state_config(settings)
    read_client_secrets(settings.oidc)
    if settings.audit.pseudonym_key_file is not None:
        read_pseudonym_key(settings.audit.pseudonym_key_file)
    if settings.server.tls is not None:
        from slurmproxy.web.tls import build_context

        build_context(settings.server.tls)
    from slurmproxy.observability.tracing import check_tracing

    check_tracing(settings.tracing)
    return settings, [*config_warnings(settings), *policy.warnings]


def validated(config: Path | None) -> tuple[Settings, list[str]] | None:
    """The settings and their warnings, or None after printing why they are invalid."""
    try:
        return validate(config)
    except ConfigError as exc:
        print(f"slurmproxy: invalid configuration\n{exc.detail}", file=sys.stderr)
    return None


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    from slurmproxy.web.protocol import server_options
    from slurmproxy.web.tls import uvicorn_tls_options

    server = settings.server
    return {
        "loop": "uvloop",
        "http": "httptools",
        "access_log": False,
        "server_header": False,
        "proxy_headers": False,
        "log_config": None,
        "timeout_graceful_shutdown": 30,
        **server_options(settings),  # slow and abusive clients: see slurmproxy/web/protocol.py
        **uvicorn_tls_options(server.tls, server.header_timeout_seconds),  # HTTPS: slurmproxy/web/tls.py
    }


def listen_options(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Where uvicorn listens: the unix socket, or host and port (the command line overrides the file)."""
    server = settings.server
    if server.unix_socket is not None and args.host is None and args.port is None:
        return {"uds": str(server.unix_socket)}
    return {"host": args.host or server.host, "port": args.port if args.port is not None else server.port}


def serve(args: argparse.Namespace) -> int:
    checked = validated(args.config)
    if checked is None:
        return EXIT_CONFIG
    settings, _ = checked  # the warnings are logged by every worker as it starts (pipeline.runtime)
    listen = listen_options(settings, args)
    refusal = plain_http_refusal(listen.get("host"), settings.server)
    if refusal is not None:  # --host names another address than the file: the same rule applies
        print(f"slurmproxy: invalid configuration\n  {refusal}", file=sys.stderr)
        return EXIT_CONFIG
    import uvicorn

    from slurmproxy.observability.logs import configure_logging
    from slurmproxy.observability.metrics import prepare_multiprocess, remove_multiprocess_dir

    configure_logging(settings.log)
    if args.config is not None:
        os.environ["SLURMPROXY_CONFIG"] = str(args.config.resolve())
    workers = args.workers or settings.server.workers
    metrics_dir = prepare_multiprocess(settings, workers)
    try:
        uvicorn.run(
            "slurmproxy.pipeline.app:create_app",
            factory=True,
            workers=workers,
            **listen,
            **uvicorn_options(settings),
        )
    finally:
        remove_multiprocess_dir(metrics_dir)
    return EXIT_OK


def check_config(args: argparse.Namespace) -> int:
    checked = validated(args.config)
    if checked is None:
        return EXIT_CONFIG
    settings, warnings = checked
    paths = ", ".join(str(p) for p in settings.policy.paths)
    print(f"configuration OK: {len(settings.oidc.issuers)} issuer(s), policy from {paths}")
    for warning in warnings:
        print(f"warning: {warning}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("serve", help="run the proxy")
    add_config_argument(parser)
    parser.add_argument("--host", help="override server.host")
    parser.add_argument("--port", type=int, help="override server.port")
    parser.add_argument("--workers", type=int, help="override server.workers")
    parser.set_defaults(run=serve)
    check = sub.add_parser("check-config", help="validate the configuration and policy files, then exit")
    add_config_argument(check)
    check.set_defaults(run=check_config)
