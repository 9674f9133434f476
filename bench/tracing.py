"""What tracing costs: the proxy with tracing off, on (every request exported to a real OpenTelemetry
Collector over OTLP/HTTP), and the code from before tracing existed, side by side.

All three proxies run in front of the same fast upstream (nginx serving a canned ping answer) with
the same token, so the differences are the proxy's own. The cases are measured in turns (off, on,
before, off, on, before, ...) for ``--rounds`` rounds and the median of each is reported, so a
machine busy with something else for a while disturbs every case alike. Each turn is one wrk run
with one connection (latency without queueing) and one with ``--connections`` (throughput; the
proxy's CPU time per request from /proc).

    .venv/bin/python -m bench.tracing [--duration 10] [--rounds 3] [--connections 16] [--baseline REV]

``--baseline`` is the revision whose ``slurmproxy/`` is "before tracing" (default: where this
branch left main, ``git merge-base HEAD main``); it runs from an extracted copy with this checkout's
virtual environment.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import tarfile
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.run import Run, measure, proxy_config, warm
from bench.stack import BenchIssuer, Nginx, bench_policy
from devstack.otel import OtelCollector
from devstack.proxy import ProxyServer

ROOT = Path(__file__).resolve().parent.parent
PING = "/slurm/v0.0.38/ping"


def extract(revision: str, target: Path) -> Path:
    """``slurmproxy/`` as it was at ``revision``, under ``target`` (put on PYTHONPATH)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "slurmproxy"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def default_baseline() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip() or "HEAD"


def median_run(runs: list[Run]) -> Run:
    """The run whose throughput is the median (its own latency and CPU figures, kept together)."""
    ordered = sorted(runs, key=lambda r: r.rps)
    chosen = ordered[len(ordered) // 2]
    chosen.extra = {"rounds": len(runs), "rps_all": [r.rps for r in runs], "p50_all": [r.p50_ms for r in runs]}
    return chosen


def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="slurmproxy-bench-tracing-", dir="/var/tmp"))
    workdir.chmod(0o755)  # nginx workers read the issuer files
    baseline = args.baseline or default_baseline()
    before_src = extract(baseline, workdir / "baseline")
    key = workdir / "jwt_hs256.key"
    key.write_bytes(b"b" * 32)
    nginx = Nginx.create(workdir / "nginx")
    issuer = BenchIssuer(workdir / "issuer", nginx.issuer_port)
    nginx.start(issuer.directory)
    servers: list[ProxyServer] = []
    try:
        with OtelCollector(workdir / "otel") as collector:
            fast = f"http://127.0.0.1:{nginx.upstream_port}"
            policy = {"bench.yaml": bench_policy(issuer.issuer)}

            def proxy(name: str, env: dict[str, str] | None = None, **sections: Any) -> ProxyServer:
                config = {**proxy_config(issuer.issuer, fast, key), **sections}
                server = ProxyServer(workdir / name, config, policy, env=env).start()
                servers.append(server)
                return server

            cases = {
                "tracing off": proxy("off"),
                "tracing on (OTLP/HTTP, every request)": proxy("on", tracing={"endpoint": collector.traces_url}),
                "tracing on (1 in 10 traces sampled)": proxy(
                    "sampled", tracing={"endpoint": collector.traces_url, "sample_ratio": 0.1}
                ),
                f"before tracing ({baseline[:10]})": proxy("before", env={"PYTHONPATH": str(before_src)}),
            }
            bearer = {"Authorization": f"Bearer {issuer.token()}"}
            for server in cases.values():
                warm(server.url + PING, bearer)
            results: dict[tuple[str, int], list[Run]] = {}
            for _ in range(args.rounds):
                for name, server in cases.items():
                    for connections in (1, args.connections):
                        got = measure(name, server.url + PING, bearer, args.duration, connections, server, nginx)
                        results.setdefault((name, connections), []).append(got)
            spans = len(collector.spans())
    finally:
        for server in servers:
            server.stop()
        nginx.stop()
    runs = [median_run(r) for r in results.values()]
    report = markdown(runs, spans, args)
    print(report)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"tracing-{stamp}.json").write_text(
        json.dumps({"runs": [asdict(r) for r in runs], "spans": spans, "args": vars(args)}, indent=2, default=str)
    )
    (out / f"tracing-{stamp}.md").write_text(report + "\n")
    print(f"\nresults: bench/results/tracing-{stamp}.md and .json")
    return 0


def markdown(runs: list[Run], spans: int, args: argparse.Namespace) -> str:
    lines = [
        "| case | conns | requests/s | p50 ms | p99 ms | proxy CPU µs/req | proxy RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(runs, key=lambda r: (r.connections, r.case)):
        cpu = "" if r.cpu_us_per_request is None else f"{r.cpu_us_per_request:.0f}"
        lines.append(
            f"| {r.case} | {r.connections} | {r.rps:,.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} | {cpu} | {r.rss_mb} |"
        )
    by = {(r.case.split(" (")[0], r.connections): r for r in runs}
    off = by[("tracing off", args.connections)]
    on = next(r for r in runs if r.case.startswith("tracing on (OTLP") and r.connections == args.connections)
    sampled = next(r for r in runs if r.case.startswith("tracing on (1 in") and r.connections == args.connections)
    before = next(r for r in runs if r.case.startswith("before") and r.connections == args.connections)
    lines += [
        "",
        f"- medians of {args.rounds} rounds of {args.duration} s each, cases in turns; {spans} spans reached the "
        "collector",
        f"- CPU per request, on vs off: {on.cpu_us_per_request} vs {off.cpu_us_per_request} µs (1 in 10 sampled: "
        f"{sampled.cpu_us_per_request} µs); off vs before tracing: {off.cpu_us_per_request} vs "
        f"{before.cpu_us_per_request} µs",
        f"- throughput, on / off: {on.rps / off.rps:.2f}x; off / before: {off.rps / before.rps:.2f}x",
        f"- spread of throughput across rounds (off): {statistics.pstdev(off.extra['rps_all']):.0f} requests/s",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="the cost of tracing")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of all cases (default 3)")
    parser.add_argument("--connections", type=int, default=16, help="connections for throughput runs")
    parser.add_argument("--baseline", help="the revision before tracing (default: git merge-base HEAD main)")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
