"""What the shared state costs, and how exactly a shared rate limit holds: embedded against shared, same run.

Starts a real Redis and PostgreSQL (devstack), nginx (a fast static upstream and the bench token
issuer's files, bench.stack) and slurmproxy instances, then measures:

1. **Cost per request**: two proxies (one worker each) in front of the fast upstream, one with
   ``state.backend: embedded`` and one with ``shared``, the same policy. Two rules: one with a rate
   limit (never reached: every request pays for the check) mapping to a service account, one
   mapping through a pool (an identity that holds its lease: one lookup per request). wrk drives
   each case with one connection (latency: p50/p99 without queueing) and N connections (throughput;
   the proxy's CPU per request from /proc, and the Redis and PostgreSQL servers' own).
2. **New leases**: newcomers leased at once from four connection pools (replicas) in PostgreSQL.
3. **Rate-limit accuracy**: three proxies (two workers each) behind nginx round robin, a rule of
   10 requests/s per identity, one identity offering 50 requests/s for 20 s; the same with the
   embedded state, which multiplies the limit by replicas × workers.

Prints Markdown and writes bench/results/state-<time>.{md,json}. Asserts nothing about time.

    .venv/bin/python -m bench.state [--duration 10] [--connections 16] [--rate-seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from bench.run import Run, children_cpu, markdown, warm, wrk, wrk_errors
from bench.stack import AUDIENCE, BenchIssuer, Nginx, cpu_seconds, process_tree, rss_bytes
from devstack.nginx import NginxBalancer
from devstack.postgres import PostgresServer
from devstack.proxy import ProxyServer
from devstack.redis_server import RedisServer
from slurmproxy.config.settings import StateSettings
from slurmproxy.state.leases import SharedLeases
from slurmproxy.state.postgres import Postgres

ROOT = Path(__file__).resolve().parent.parent
PING = "/slurm/v0.0.42/ping"


def policy(issuer: str, limit: float) -> dict[str, Any]:
    def rule(rule_id: str, subject: str, **extra: Any) -> dict[str, Any]:
        return {"id": rule_id, "issuers": [issuer], "subjects": [subject], "allow": ["ping"], **extra}

    return {
        "rules": [
            rule(
                "limited",
                "bench-limited",
                mapping=[{"service_account": "svc-alpha"}],
                rate_limit={"per_identity": {"requests": limit}},
            ),
            rule("pooled", "bench-pooled", mapping=[{"pool": "bench"}]),
        ]
    }


def config(
    issuer: str, upstream: str, key: Path, state: dict[str, Any] | None, workdir: Path, workers: int = 1
) -> dict[str, Any]:
    identity: dict[str, Any] = {"min_uid": 1000, "pools": {"bench": {"accounts": ["pool001..pool050"]}}}
    if state is None:
        identity["pool_database"] = str(workdir / "leases.sqlite")
    return {
        "server": {"workers": workers},
        "oidc": {"issuers": [{"issuer": issuer, "audiences": [AUDIENCE]}]},
        "upstream": {"url": upstream, "auth": "mint", "jwt_key_file": str(key), "api_versions_refresh_seconds": 0},
        "identity": identity,
        "shield": {"coalesce": False},  # every request forwarded: the cost of the state, not of the shield
        "audit": {"sink": "file", "file": str(workdir / "audit.log")},
        **({"state": state} if state is not None else {}),
    }


def measure(
    case: str,
    url: str,
    headers: dict[str, str],
    duration: int,
    connections: int,
    server: ProxyServer,
    state_pids: Callable[[], list[int]],
) -> Run:
    assert server.proc is not None
    pids, extra = process_tree(server.proc.pid), state_pids()  # PostgreSQL's backends exist once connected
    before, extra_before, wrk_before = cpu_seconds(pids), cpu_seconds(extra), children_cpu()
    data = wrk(url, headers, duration, connections)
    cpu, state_cpu = cpu_seconds(pids) - before, cpu_seconds(extra) - extra_before
    wall, requests = data["duration_us"] / 1e6, int(data["requests"])
    run = Run(
        case=case,
        connections=connections,
        requests=requests,
        rps=round(requests / wall, 1),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        p999_ms=data["p999_us"] / 1000,
        errors=wrk_errors(data),
        cpu_us_per_request=round(cpu / requests * 1e6, 1) if requests else None,
        rss_mb=round(rss_bytes(pids) / 2**20, 1),
        proxy_cpu_pct=round(cpu / wall * 100),
        wrk_cpu_pct=round((children_cpu() - wrk_before) / wall * 100),
    )
    run.extra["state_server_cpu_us_per_request"] = round(state_cpu / requests * 1e6, 1) if requests else None
    return run


async def offer(url: str, token: str, per_second: float, seconds: float) -> dict[str, Any]:
    """``per_second`` requests a second from one identity, each sent on time whatever the answers take."""
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one() -> tuple[float, float, int]:
            sent = time.monotonic()
            response = await client.get(PING, headers={"Authorization": f"Bearer {token}"})
            return sent, time.monotonic(), response.status_code

        start, tasks = time.monotonic(), []
        for n in range(int(per_second * seconds)):
            await asyncio.sleep(max(0.0, start + n / per_second - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
        answers = await asyncio.gather(*tasks)
    statuses = Counter(status for _, _, status in answers)
    sent = [s for s, _, _ in answers]
    return {"offered": len(answers), "seconds": max(sent) - min(sent), "statuses": dict(statuses)}


def accuracy(result: dict[str, Any], limit: float) -> dict[str, Any]:
    accepted = result["statuses"].get(200, 0)
    rate = (accepted - limit) / result["seconds"]  # the burst (= limit) goes through at once
    return {
        **result,
        "accepted": accepted,
        "accepted_per_second": round(rate, 2),
        "error_pct": round((rate / limit - 1) * 100, 1),
    }


async def lease_crowd(pg: PostgresServer, newcomers: int) -> dict[str, Any]:
    settings = StateSettings.model_validate(
        {
            "backend": "shared",
            "redis": {"url": "redis://127.0.0.1:1/0"},
            "postgres": {"dsn": pg.dsn_without_password, "password_file": str(pg.password_file), "timeout_seconds": 60},
        }
    )
    dbs = [Postgres(settings) for _ in range(4)]
    accounts = tuple(f"crowd{n:05d}" for n in range(newcomers))
    stores = [SharedLeases(db, {"crowd": accounts}) for db in dbs]
    try:
        await asyncio.gather(*(db.run("warm", lambda c: c.execute("SELECT 1")) for db in dbs))
        started = time.perf_counter()
        leases = await asyncio.gather(
            *(stores[n % 4].lease("crowd", "https://bench", f"s{n}") for n in range(newcomers))
        )
        elapsed = time.perf_counter() - started
        started = time.perf_counter()
        for n in range(200):
            await stores[n % 4].find("crowd", "https://bench", f"s{n}")
        find_ms = (time.perf_counter() - started) / 200 * 1000
    finally:
        for db in dbs:
            await db.close()
    return {
        "newcomers": newcomers,
        "distinct_accounts": len({lease.account for lease in leases}),
        "seconds": round(elapsed, 3),
        "ms_per_new_lease": round(elapsed / newcomers * 1000, 2),
        "ms_per_lookup_sequential": round(find_ms, 3),
    }


def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="slurmproxy-bench-state-", dir="/var/tmp"))
    workdir.chmod(0o755)  # nginx workers read the issuer files
    key = workdir / "jwt.key"
    key.write_bytes(b"k" * 32)
    nginx = Nginx.create(workdir / "nginx")
    servers: list[ProxyServer] = []
    results: dict[str, Any] = {}
    with RedisServer(workdir) as redis_server, PostgresServer(workdir) as pg:
        issuer = BenchIssuer(workdir / "issuer", nginx.issuer_port)
        nginx.start(issuer.directory)
        try:
            fast = f"http://127.0.0.1:{nginx.upstream_port}"
            shared = {
                "backend": "shared",
                "redis": {"url": redis_server.url_without_password, "password_file": str(redis_server.password_file)},
                "postgres": {"dsn": pg.dsn_without_password, "password_file": str(pg.password_file)},
            }

            def proxy(name: str, state: dict[str, Any] | None, limit: float, workers: int = 1) -> ProxyServer:
                directory = workdir / name
                directory.mkdir()
                server = ProxyServer(
                    directory,
                    config(issuer.issuer, fast, key, state, directory, workers),
                    {"bench.yaml": policy(issuer.issuer, limit)},
                ).start()
                servers.append(server)
                return server

            def state_pids() -> list[int]:
                return redis_server.pids() + pg.pids()

            def no_pids() -> list[int]:
                return []

            proxies = {"embedded": proxy("embedded", None, 1e9), "shared": proxy("shared", shared, 1e9)}
            runs: list[Run] = []
            for rule, subject in (("rate limit", "bench-limited"), ("pool lease", "bench-pooled")):
                headers = {"Authorization": f"Bearer {issuer.token(subject)}"}
                for server in proxies.values():
                    warm(server.url + PING, headers)
                for backend, server in proxies.items():
                    name = f"{rule}, {backend}"
                    extra = state_pids if backend == "shared" else no_pids
                    runs.append(measure(name, server.url + PING, headers, args.duration, 1, server, extra))
                    runs.append(
                        measure(name, server.url + PING, headers, args.duration, args.connections, server, extra)
                    )
            warm(proxies["shared"].url + PING, {"Authorization": f"Bearer {issuer.token('bench-limited')}"}, count=1)
            (bucket,) = redis_server.cli("--scan").split()  # it expires one second after: read it now
            results["bucket_bytes"] = redis_server.cli("MEMORY", "USAGE", bucket)
            for server in list(proxies.values()):
                server.stop()
            results["new_leases"] = asyncio.run(lease_crowd(pg, args.newcomers))

            limit = 10.0
            for backend, state in (("shared", shared), ("embedded", None)):
                replicas = [proxy(f"{backend}-replica-{n}", state, limit, workers=2) for n in range(3)]
                with NginxBalancer(workdir / f"lb-{backend}", [f"127.0.0.1:{r.port}" for r in replicas]) as lb:
                    token = issuer.token("bench-limited")
                    offered = asyncio.run(offer(lb.url, token, args.offered, args.rate_seconds))
                    results[f"rate_limit_{backend}"] = accuracy(offered, limit)
                for replica in replicas:
                    replica.stop()
        finally:
            for server in servers:
                server.stop()
            nginx.stop()

    by = {(r.case, r.connections): r for r in runs}
    summary: dict[str, Any] = {}
    for rule in ("rate limit", "pool lease"):
        e1, s1 = by[(f"{rule}, embedded", 1)], by[(f"{rule}, shared", 1)]
        en, sn = by[(f"{rule}, embedded", args.connections)], by[(f"{rule}, shared", args.connections)]
        summary[f"{rule}: added latency, shared - embedded (1 connection)"] = (
            f"p50 {s1.p50_ms - e1.p50_ms:+.3f} ms, p99 {s1.p99_ms - e1.p99_ms:+.3f} ms"
        )
        summary[f"{rule}: added proxy CPU per request, shared - embedded ({args.connections} connections)"] = (
            f"{(sn.cpu_us_per_request or 0) - (en.cpu_us_per_request or 0):+.0f} µs "
            f"({en.cpu_us_per_request:.0f} → {sn.cpu_us_per_request:.0f}); Redis + PostgreSQL servers: "
            f"{sn.extra['state_server_cpu_us_per_request']} µs"
        )
    shared_rl, embedded_rl = results["rate_limit_shared"], results["rate_limit_embedded"]
    summary["rate limit 10/s, 3 replicas × 2 workers, shared"] = (
        f"{shared_rl['offered']} offered in {shared_rl['seconds']:.1f} s, {shared_rl['accepted']} accepted: "
        f"{shared_rl['accepted_per_second']}/s after the burst ({shared_rl['error_pct']:+.1f} %), statuses "
        f"{shared_rl['statuses']}"
    )
    summary["the same, embedded"] = (
        f"{embedded_rl['accepted']} accepted: {embedded_rl['accepted_per_second']}/s "
        f"({embedded_rl['error_pct']:+.1f} %)"
    )
    nl = results["new_leases"]
    summary["new leases in PostgreSQL, 4 replicas at once"] = (
        f"{nl['newcomers']} newcomers, {nl['distinct_accounts']} distinct accounts in {nl['seconds']} s "
        f"({nl['ms_per_new_lease']} ms each, one at a time per pool); "
        f"a holder's lookup {nl['ms_per_lookup_sequential']} ms"
    )
    summary["Redis memory per rate-limit bucket"] = f"{results['bucket_bytes']} bytes (MEMORY USAGE)"
    report = markdown(runs, summary)
    print(report)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"state-{stamp}.json").write_text(
        json.dumps(
            {"runs": [asdict(r) for r in runs], "results": results, "summary": summary, "args": vars(args)}, indent=2
        )
    )
    (out / f"state-{stamp}.md").write_text(report + "\n")
    print(f"\nresults: bench/results/state-{stamp}.md and .json")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="slurmproxy shared-state benchmark")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=16, help="connections for throughput runs")
    parser.add_argument("--rate-seconds", type=float, default=20.0, help="length of the rate-limit run")
    parser.add_argument("--offered", type=float, default=50.0, help="requests per second offered by one identity")
    parser.add_argument("--newcomers", type=int, default=200, help="identities leased at once in PostgreSQL")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
