"""The benchmark: slurmproxy's added latency and own cost, side by side with slurmrestd and nginx.

Starts a real Slurm, nginx (a minimal fast upstream, a C reverse proxy in front of it, and the
static files of a bench token issuer) and slurmproxy instances, then drives each case with wrk on
loopback for a bounded time:

  (a) slurmrestd directly                      (b) slurmrestd through slurmproxy
  (c) slurmproxy in front of the fast upstream (d) nginx proxy_pass in front of the same upstream
  (e) case (c) with 2 workers                  (f) the fast upstream alone (the floor)

Each case runs twice: one connection (latency: p50/p99/p99.9 without queueing) and N connections
(throughput). The proxy's CPU time per request comes from /proc (utime + stime of the server's
process tree) over the throughput run. Results: Markdown on stdout, JSON in bench/results/.

    .venv/bin/python -m bench.run [--duration 10] [--connections 16] [--generation 22.05]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.stack import AUDIENCE, BenchIssuer, Nginx, bench_policy, cpu_seconds, process_tree, rss_bytes
from devstack import SlurmCluster
from devstack.proxy import ProxyServer

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "bench" / "report.lua"


@dataclass
class Run:
    case: str
    connections: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    errors: int
    cpu_us_per_request: float | None = None
    rss_mb: float | None = None
    proxy_cpu_pct: float | None = None  # % of one core, over the run
    wrk_cpu_pct: float = 0.0
    nginx_cpu_pct: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def wrk(
    url: str, headers: dict[str, str], duration: int, connections: int, token_file: Path | None = None
) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s", str(LUA)]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    if token_file is not None:
        argv += ["--", str(token_file)]
    return wrk_summary(subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True).stdout)


def wrk_summary(out: str) -> dict[str, Any]:
    """The JSON line bench/report.lua prints at the end of a wrk run."""
    match = re.search(r"^WRKJSON (.*)$", out, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    data: dict[str, Any] = json.loads(match.group(1))
    return data


def wrk_errors(data: dict[str, Any]) -> int:
    return sum(int(data[k]) for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(
    case: str,
    url: str,
    headers: dict[str, str],
    duration: int,
    connections: int,
    server: ProxyServer | None = None,
    nginx: Nginx | None = None,
) -> Run:
    pids = process_tree(server.proc.pid) if server is not None and server.proc is not None else []
    nginx_pids = process_tree(nginx.proc.pid) if nginx is not None and nginx.proc is not None else []
    cpu_before, nginx_before, wrk_before = cpu_seconds(pids), cpu_seconds(nginx_pids), children_cpu()
    data = wrk(url, headers, duration, connections)
    cpu = cpu_seconds(pids) - cpu_before
    wall = data["duration_us"] / 1e6
    requests = int(data["requests"])
    errors = wrk_errors(data)
    return Run(
        case=case,
        connections=connections,
        requests=requests,
        rps=round(requests / (data["duration_us"] / 1e6), 1),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        p999_ms=data["p999_us"] / 1000,
        errors=errors,
        cpu_us_per_request=round(cpu / requests * 1e6, 1) if pids and requests else None,
        rss_mb=round(rss_bytes(pids) / 2**20, 1) if pids else None,
        proxy_cpu_pct=round(cpu / wall * 100) if pids else None,
        wrk_cpu_pct=round((children_cpu() - wrk_before) / wall * 100),
        nginx_cpu_pct=round((cpu_seconds(nginx_pids) - nginx_before) / wall * 100),
    )


def warm(url: str, headers: dict[str, str], count: int = 200) -> None:
    with httpx.Client(headers=headers, timeout=30) as client:
        for _ in range(count):
            response = client.get(url)
            if response.status_code != 200:
                raise RuntimeError(f"warm-up of {url} answered {response.status_code}: {response.text[:300]}")


def proxy_config(issuer: str, upstream: str, key: Path, workers: int = 1) -> dict[str, Any]:
    return {
        "server": {"workers": workers},
        "oidc": {"issuers": [{"issuer": issuer, "audiences": [AUDIENCE]}]},
        "upstream": {"url": upstream, "auth": "mint", "jwt_key_file": str(key)},
        "identity": {"min_uid": 1000},
        # Every request forwarded: the figures are the cost of forwarding, not of the polling shield
        # answering identical concurrent pings from one coalesced request (bench.shield measures that).
        "shield": {"coalesce": False},
    }


def markdown(runs: list[Run], summary: dict[str, Any]) -> str:
    lines = [
        "| case | conns | requests/s | p50 ms | p99 ms | p99.9 ms | errors | proxy CPU µs/req | proxy RSS MB "
        "| CPU % proxy / wrk / nginx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        cpu = "" if r.cpu_us_per_request is None else f"{r.cpu_us_per_request:.0f}"
        rss = "" if r.rss_mb is None else f"{r.rss_mb:.0f}"
        lines.append(
            f"| {r.case} | {r.connections} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.p999_ms:.2f} "
            f"| {r.errors} | {cpu} | {rss} | {r.proxy_cpu_pct or '-'} / {r.wrk_cpu_pct} / {r.nginx_cpu_pct} |"
        )
    lines.append("")
    for key, value in summary.items():
        lines.append(f"- **{key}**: {value}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="slurmproxy-bench-", dir="/var/tmp"))
    workdir.chmod(0o755)  # nginx workers (www-data) read the issuer files
    servers: list[ProxyServer] = []
    nginx = Nginx.create(workdir / "nginx")
    with SlurmCluster(workdir / "slurm", args.generation) as slurm:
        issuer = BenchIssuer(workdir / "issuer", nginx.issuer_port)
        nginx.start(issuer.directory)
        try:
            fast = f"http://127.0.0.1:{nginx.upstream_port}"
            policy = {"bench.yaml": bench_policy(issuer.issuer)}

            def proxy(name: str, upstream: str, workers: int = 1) -> ProxyServer:
                config = proxy_config(issuer.issuer, upstream, slurm.jwt_key_path, workers)
                server = ProxyServer(workdir / name, config, policy).start()
                servers.append(server)
                return server

            via_slurm = proxy("proxy-slurm", slurm.url)
            via_fast = proxy("proxy-fast", fast)
            via_fast2 = proxy("proxy-fast-2w", fast, workers=2)
            version = slurm.api_versions[-1]
            ping = f"/slurm/{version}/ping"
            bearer = {"Authorization": f"Bearer {issuer.token()}"}
            direct = {"X-SLURM-USER-NAME": "svc-alpha", "X-SLURM-USER-TOKEN": slurm.mint_token("svc-alpha", 7200)}
            cases: list[tuple[str, str, dict[str, str], ProxyServer | None]] = [
                ("(a) slurmrestd direct", slurm.url + ping, direct, None),
                ("(b) slurmproxy -> slurmrestd", via_slurm.url + ping, bearer, via_slurm),
                ("(c) slurmproxy -> fast upstream", via_fast.url + ping, bearer, via_fast),
                ("(d) nginx -> fast upstream", f"http://127.0.0.1:{nginx.proxy_port}{ping}", {}, None),
                ("(e) slurmproxy 2 workers -> fast upstream", via_fast2.url + ping, bearer, via_fast2),
                ("(f) fast upstream alone", fast + ping, {}, None),
            ]
            for _, url, headers, _ in cases:
                warm(url, headers)
            runs: list[Run] = []
            for name, url, headers, server in cases:
                if not name.startswith("(e)"):
                    runs.append(measure(name, url, headers, args.duration, 1, server, nginx))
                runs.append(measure(name, url, headers, args.duration, args.connections, server, nginx))
        finally:
            for server in servers:
                server.stop()
            nginx.stop()

    by = {(r.case[:3], r.connections): r for r in runs}
    a1, b1 = by[("(a)", 1)], by[("(b)", 1)]
    c_n, e_n = by[("(c)", args.connections)], by[("(e)", args.connections)]
    summary = {
        "added latency p50 (b - a, 1 connection)": f"{b1.p50_ms - a1.p50_ms:.2f} ms (target <= 1 ms)",
        "added latency p99 (b - a, 1 connection)": f"{b1.p99_ms - a1.p99_ms:.2f} ms (target <= 5 ms)",
        "proxy CPU per forwarded request (c)": f"{c_n.cpu_us_per_request} µs (target <= 250 µs)",
        "2 workers / 1 worker throughput (e / c)": f"{e_n.rps / c_n.rps:.2f}x (target >= 1.7x where wrk is not the "
        f"bottleneck; this machine has {os.cpu_count()} cores: in (e) the proxy used {e_n.proxy_cpu_pct} %, wrk "
        f"{e_n.wrk_cpu_pct} % and nginx {e_n.nginx_cpu_pct} % of one core)",
        "Slurm": f"{args.generation}, OpenAPI {version}",
    }
    report = markdown(runs, summary)
    print(report)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"run-{stamp}.json").write_text(
        json.dumps({"runs": [asdict(r) for r in runs], "summary": summary, "args": vars(args)}, indent=2, default=str)
    )
    (out / f"run-{stamp}.md").write_text(report + "\n")
    print(f"\nresults: bench/results/run-{stamp}.md and .json")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="slurmproxy benchmark")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=16, help="connections for throughput runs")
    parser.add_argument("--generation", choices=["22.05", "24.11"], default="22.05")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
