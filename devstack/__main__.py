"""``python -m devstack up``: start a Slurm cluster and the OpenID provider by hand, until Ctrl-C.

    python -m devstack up [--generation 22.05|24.11|26.05] [--accounting] [--workdir DIR]

Prints the URLs, paths and client ids needed to point a proxy at them (not the secrets: they are
in ``<workdir>/oidc/provider-config.json``, mode 0600).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

from .slurm import GENERATIONS, SlurmCluster
from .users import ALL_USERS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a cluster and the provider until interrupted")
    up.add_argument("--generation", choices=list(GENERATIONS), default="22.05")
    up.add_argument(
        "--accounting",
        action="store_true",
        help="slurmdbd with its own MariaDB; account 'devstack' with every person and service user",
    )
    up.add_argument("--workdir", type=Path, default=None)
    up.add_argument("--no-oidc", action="store_true", help="only the Slurm cluster")
    args = parser.parse_args(argv)

    workdir: Path = args.workdir or Path(tempfile.mkdtemp(prefix="devstack-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    members = [u.name for u in ALL_USERS if u.kind in ("person", "service")]
    accounts = {"devstack": members} if args.accounting else None
    with SlurmCluster(workdir / "slurm", args.generation, accounting=args.accounting, accounts=accounts) as cluster:
        print(f"slurm {args.generation}: {cluster.url}  (unix socket {cluster.unix_socket})")
        if args.accounting:
            print(f"  slurmdbd       127.0.0.1:{cluster.dbd_port}, account 'devstack': {', '.join(members)}")
            print(f"  slurmdb api    {' '.join(cluster.slurmdb_versions)}")
        print(f"  api versions   {' '.join(cluster.api_versions)}")
        print(f"  SLURM_CONF={cluster.conf_path}")
        print(f"  jwt key        {cluster.jwt_key_path}")
        if args.no_oidc:
            stop.wait()
            return 0
        from .provider import PROXY_CLIENT, OidcProvider

        with OidcProvider(workdir / "oidc") as provider:
            print(f"oidc issuer: {provider.issuer}  (admin {provider.admin_url})")
            print(f"  discovery      {provider.discovery_url}")
            print(f"  proxy client   {PROXY_CLIENT} (secret in {provider.workdir / 'provider-config.json'})")
            print("ready; Ctrl-C stops everything", flush=True)
            stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
