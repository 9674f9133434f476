"""Memory soak: the proxy's RSS while wrk cycles through many distinct tokens (not a CI test).

Starts nginx (the bench token issuer's static files and the fast upstream) and one slurmproxy in
front of the fast upstream, signs ``--tokens`` tokens for as many distinct subjects, then runs wrk
for ``--duration`` seconds with the tokens in rotation, so that every cache keyed by token or
identity sees far more keys than it may hold. Every ``--every`` seconds it samples the RSS of the
proxy's process tree. The verdict compares the highest later sample with the baseline, the first
sample at or after ``--baseline`` seconds (caches full, allocator warm): flat means within 10 %.

    .venv/bin/python -m bench.memory [--tokens 100000] [--duration 600] [--connections 16]

Results: a Markdown summary on stdout, JSON in bench/results/memory-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.run import LUA, warm, wrk_errors, wrk_summary
from bench.stack import AUDIENCE, BenchIssuer, Nginx, bench_policy, cpu_seconds, process_tree, rss_bytes
from devstack.proxy import ProxyServer

ROOT = Path(__file__).resolve().parent.parent
FLAT = 0.10


def cache_counts(url: str) -> dict[str, float]:
    """``slurmproxy_cache_requests_total`` by cache and result, from the proxy's metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    counts: dict[str, float] = {}
    for match in re.finditer(r"^slurmproxy_cache_requests_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        counts[f"{labels.get('cache', '?')}/{labels.get('result', '?')}"] = float(match.group(2))
    return counts


def sign_tokens(issuer: BenchIssuer, count: int, path: Path) -> None:
    with path.open("w") as out:
        for n in range(count):
            out.write(issuer.token(subject=f"soak-{n:06d}", lifetime=86400) + "\n")


def verdict(samples: list[tuple[float, float]], baseline_at: float) -> dict[str, Any]:
    later = [(t, mb) for t, mb in samples if t >= baseline_at]
    if len(later) < 2:
        return {"flat": None, "reason": "too few samples after the baseline"}
    base = later[0][1]
    peak = max(mb for _, mb in later)
    growth = (peak - base) / base
    return {
        "baseline_s": round(later[0][0]),
        "baseline_mb": base,
        "peak_mb": peak,
        "end_mb": later[-1][1],
        "growth_pct": round(growth * 100, 1),
        "flat": growth <= FLAT,
    }


def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="slurmproxy-memory-", dir="/var/tmp"))
    workdir.chmod(0o755)  # nginx workers (www-data) read the issuer files
    nginx = Nginx.create(workdir / "nginx")
    issuer = BenchIssuer(workdir / "issuer", nginx.issuer_port)
    nginx.start(issuer.directory)
    server: ProxyServer | None = None
    try:
        key = workdir / "jwt.key"
        key.write_bytes(os.urandom(32))
        upstream = f"http://127.0.0.1:{nginx.upstream_port}"
        config = {
            "oidc": {"issuers": [{"issuer": issuer.issuer, "audiences": [AUDIENCE]}]},
            "upstream": {"url": upstream, "auth": "mint", "jwt_key_file": str(key)},
            "identity": {"min_uid": 1000},
            "audit": {"sink": "file", "file": str(workdir / "audit.log"), "max_bytes": 64 * 2**20, "keep": 2},
        }
        server = ProxyServer(workdir / "proxy", config, {"bench.yaml": bench_policy(issuer.issuer)}).start()
        tokens = workdir / "tokens.txt"
        started = time.monotonic()
        sign_tokens(issuer, args.tokens, tokens)
        print(f"signed {args.tokens} tokens in {time.monotonic() - started:.0f} s; workdir {workdir}", flush=True)
        ping = f"{server.url}/slurm/v0.0.38/ping"
        warm(ping, {"Authorization": f"Bearer {issuer.token()}"})
        pids = process_tree(server.proc.pid) if server.proc is not None else []
        before = cache_counts(server.url)
        cpu_before = cpu_seconds(pids)
        argv = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--timeout", "10s", "-s", str(LUA)]
        load = subprocess.Popen([*argv, ping, "--", str(tokens)], stdout=subprocess.PIPE, text=True)
        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()
        print("| s | proxy RSS MB |\n|---:|---:|", flush=True)
        while load.poll() is None:
            time.sleep(min(args.every, max(0.1, args.duration + 5 - (time.monotonic() - t0))))
            if load.poll() is None:
                t = time.monotonic() - t0
                mb = round(rss_bytes(process_tree(pids[0]) if pids else []) / 2**20, 1)
                samples.append((round(t, 1), mb))
                print(f"| {t:.0f} | {mb} |", flush=True)
        out, _ = load.communicate()
        cpu = cpu_seconds(process_tree(pids[0]) if pids else []) - cpu_before
        after = cache_counts(server.url)
    finally:
        if server is not None:
            server.stop()
        nginx.stop()
    data = wrk_summary(out)
    errors = wrk_errors(data)
    requests = int(data["requests"])
    result = {
        "distinct tokens": args.tokens,
        "duration s": args.duration,
        "requests": requests,
        "requests/s": round(requests / (data["duration_us"] / 1e6), 1),
        "errors": errors,
        "p50 ms": data["p50_us"] / 1000,
        "p99 ms": data["p99_us"] / 1000,
        "proxy CPU µs/request": round(cpu / requests * 1e6, 1) if requests else None,
        "cache requests during the run": {k: after.get(k, 0) - before.get(k, 0) for k in sorted(after)},
        **verdict(samples, args.baseline),
    }
    print("\n| figure | value |\n|---|---|")
    for name, value in result.items():
        print(f"| {name} | {value} |")
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    path = results / f"memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"summary": result, "samples": samples, "args": vars(args)}, indent=1))
    print(f"\nresults: {path.relative_to(ROOT)}")
    return 0 if result["flat"] and not errors else 1


def main() -> int:
    parser = argparse.ArgumentParser(description="slurmproxy memory soak with many distinct tokens")
    parser.add_argument("--tokens", type=int, default=100_000, help="distinct tokens (default 100000)")
    parser.add_argument("--duration", type=int, default=600, help="seconds of load (default 600)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--every", type=float, default=10, help="seconds between RSS samples (default 10)")
    parser.add_argument("--baseline", type=float, default=60, help="seconds before the baseline sample (default 60)")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
