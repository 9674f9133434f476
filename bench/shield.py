"""The polling shield against a real slurmctld: RPCs that reach it with the shield off and on.

Starts a real Slurm and ``--clients`` polling clients, each a distinct federated identity whose
token the proxy validates; a mapping table spreads them over ``--accounts`` pool accounts (as in a
group or a workflow engine's workers sharing one account). Each client fetches its job list
(``GET /slurm/{version}/jobs``) ``--polls`` times, pausing ``--interval`` seconds between polls.
The same load runs against three proxies in turn:

  off       coalescing and cache off: every poll is a slurmrestd request
  coalesce  the default: concurrent identical GETs for one local account share one request
  cache     coalescing plus a 2-second per-account cache of job lists

For each, slurmctld's own RPC counters (``sdiag``, reset before the run) say how many RPCs reached
it; the ratio to ``off`` is the shield's effect. The audit log says how each poll was served.

    .venv/bin/python -m bench.shield [--clients 200] [--accounts 50] [--polls 40] [--interval 0.25]

Results: Markdown on stdout, JSON in bench/results/shield-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.stack import AUDIENCE, ENTITLEMENT, BenchIssuer, Nginx
from devstack import SlurmCluster
from devstack.proxy import ProxyServer

ROOT = Path(__file__).resolve().parent.parent
MODES: dict[str, dict[str, Any]] = {
    "off": {"coalesce": False},
    "coalesce": {"coalesce": True},
    "cache": {"coalesce": True, "cache": [{"path": "/slurm/{version}/jobs", "ttl_seconds": 2}]},
}
IGNORED_RPCS = {"REQUEST_STATS_INFO"}  # sdiag's own (as root or the SlurmUser)


def policy(issuer: str, subjects: list[str], accounts: int) -> dict[str, Any]:
    entries = [{"issuer": issuer, "subject": s, "user": f"pool{n % accounts + 1:03d}"} for n, s in enumerate(subjects)]
    return {
        "rules": [
            {
                "id": "pollers",
                "issuers": [issuer],
                "entitlements": [ENTITLEMENT],
                "allow": ["ping", "read-only"],
                "mapping": [{"table": "pollers"}],
            }
        ],
        "tables": {"pollers": {"entries": entries}},
    }


async def poll(url: str, token: str, polls: int, interval: float, statuses: Counter[int]) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(headers=headers, timeout=120) as client:
        for n in range(polls):
            response = await client.get(url)
            statuses[response.status_code] += 1
            if n + 1 < polls:
                await asyncio.sleep(interval)


async def storm(url: str, tokens: list[str], polls: int, interval: float) -> tuple[Counter[int], float]:
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    await asyncio.gather(*(poll(url, token, polls, interval, statuses) for token in tokens))
    return statuses, time.monotonic() - started


def run_mode(
    name: str, slurm: SlurmCluster, issuer: BenchIssuer, tokens: list[str], workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    config = {
        "oidc": {"issuers": [{"issuer": issuer.issuer, "audiences": [AUDIENCE]}]},
        "upstream": {"url": slurm.url, "auth": "mint", "jwt_key_file": str(slurm.jwt_key_path)},
        "identity": {"min_uid": 1000},
        "shield": MODES[name],
    }
    subjects = [f"poller-{n:03d}" for n in range(args.clients)]
    files = {"pollers.yaml": policy(issuer.issuer, subjects, args.accounts)}
    with ProxyServer(workdir / f"proxy-{name}", config, files) as server:
        url = f"{server.url}/slurm/{slurm.api_versions[-1]}/jobs"
        slurm.reset_diag()
        statuses, seconds = asyncio.run(storm(url, tokens, args.polls, args.interval))
        diag = slurm.diag()
        rpcs = {k: v for k, v in diag.items() if k != "total" and not k.startswith("user:") and k not in IGNORED_RPCS}
        users = {k.removeprefix("user:") for k in diag if k.startswith("user:")} - {"root", slurm.slurm_user}
        served = Counter(str(r.get("served_from")) for r in server.audit_records())
    polls = sum(statuses.values())
    return {
        "mode": name,
        "polls": polls,
        "ok": statuses.get(200, 0),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "seconds": round(seconds, 1),
        "slurmctld_rpcs": sum(rpcs.values()),
        "job_info_rpcs": rpcs.get("REQUEST_JOB_INFO", 0),
        "rpcs_by_type": rpcs,
        "accounts_seen_by_slurmctld": len(users),
        "served_from": dict(served),
    }


def markdown(results: list[dict[str, Any]]) -> str:
    off = max(results[0]["slurmctld_rpcs"], 1)
    lines = [
        "| shield | polls | 200 OK | seconds | slurmctld RPCs | REQUEST_JOB_INFO | fewer than off | served from |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        served = ", ".join(f"{k} {v}" for k, v in sorted(r["served_from"].items()))
        ratio = off / max(r["slurmctld_rpcs"], 1)
        lines.append(
            f"| {r['mode']} | {r['polls']} | {r['ok']} | {r['seconds']} | {r['slurmctld_rpcs']} "
            f"| {r['job_info_rpcs']} | {ratio:.1f}x | {served} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="slurmproxy-shield-", dir="/var/tmp"))
    workdir.chmod(0o755)  # nginx workers (www-data) read the issuer files
    nginx = Nginx.create(workdir / "nginx")
    results: list[dict[str, Any]] = []
    with SlurmCluster(workdir / "slurm", args.generation) as slurm:
        issuer = BenchIssuer(workdir / "issuer", nginx.issuer_port)
        nginx.start(issuer.directory)
        try:
            tokens = [issuer.token(subject=f"poller-{n:03d}") for n in range(args.clients)]
            for mode in MODES:
                results.append(run_mode(mode, slurm, issuer, tokens, workdir, args))
                print(f"{mode}: {results[-1]['slurmctld_rpcs']} RPCs in {results[-1]['seconds']} s", flush=True)
        finally:
            nginx.stop()
    report = markdown(results)
    header = (
        f"{args.clients} clients over {args.accounts} accounts, {args.polls} polls each, "
        f"{args.interval} s apart; Slurm {args.generation}"
    )
    print(f"\n{header}\n\n{report}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    path = out / f"shield-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"results": results, "args": vars(args)}, indent=1))
    print(f"\nresults: {path.relative_to(ROOT)}")
    failed = any(r["ok"] != r["polls"] for r in results)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description="slurmproxy polling shield against a real slurmctld")
    parser.add_argument("--clients", type=int, default=200, help="polling clients (default 200)")
    parser.add_argument("--accounts", type=int, default=50, help="pool accounts they map to (1 to 50; default 50)")
    parser.add_argument("--polls", type=int, default=40, help="polls per client (default 40)")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between a client's polls")
    parser.add_argument("--generation", choices=["22.05", "24.11"], default="22.05")
    args = parser.parse_args()
    if not 1 <= args.accounts <= 50:
        parser.error("--accounts must be between 1 and 50 (the devstack's pool001 to pool050)")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
