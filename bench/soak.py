"""Soak test: a fixed request rate for a bounded time on loopback (not a CI test).

Starts nginx (the bench token issuer's static files, and a fast upstream), optionally a real Slurm,
and one slurmproxy, then sends requests at a fixed rate (open loop: a slow answer does not slow the
sender) with a realistic mix: allowed reads from many identities, a hot identity that hits its rate
limit, denied operations, bad tokens and bad paths. Every ``--every`` seconds it prints the
requests sent and answered, errors, latency and the proxy's memory and open files; at the end it
compares the audit records with the answers the client saw.

    .venv/bin/python -m bench.soak [--rate 200] [--duration 600] [--upstream slurm|fast]

Results: a Markdown summary on stdout, JSON in bench/results/soak-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.stack import AUDIENCE, ENTITLEMENT, BenchIssuer, Nginx, process_tree, rss_bytes
from devstack import SlurmCluster
from devstack.proxy import ProxyServer
from slurmproxy.audit.file import rotated_files

ROOT = Path(__file__).resolve().parent.parent
SUBJECTS = 500  # distinct identities: token cache and rate-limit buckets both grow with them
MAX_IN_FLIGHT = 2000


@dataclass
class Window:
    t: float
    sent: int
    answered: int
    errors: int
    statuses: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    rss_mb: float
    open_files: int
    audit_records: int


@dataclass
class Soak:
    rate: float
    duration: float
    sent: int = 0
    answered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    in_flight: int = 0
    overruns: int = 0  # requests not sent because MAX_IN_FLIGHT were already waiting


def soak_policy(issuer: str) -> dict[str, Any]:
    return {
        "rules": [
            {
                "id": "hot",
                "issuers": [issuer],
                "subjects": ["hot-user"],
                "allow": ["ping", "read-only"],
                "mapping": [{"service_account": "svc-alpha"}],
                "rate_limit": {"per_identity": {"requests": 5, "period_seconds": 1, "burst": 10}},
            },
            {
                "id": "bench",
                "issuers": [issuer],
                "entitlements": [ENTITLEMENT],
                "allow": ["ping", "read-only"],
                "mapping": [{"service_account": "svc-alpha"}],
                "rate_limit": {"per_identity": {"requests": 50, "period_seconds": 1, "burst": 100}},
            },
        ]
    }


def request_mix(issuer: BenchIssuer, version: str) -> list[tuple[float, str, str, dict[str, str]]]:
    """(weight, method, path, headers): what a busy site sees, good and bad."""
    tokens = [issuer.token(subject=f"user-{n}", lifetime=86400) for n in range(SUBJECTS)]
    hot = issuer.token(subject="hot-user", lifetime=86400)
    expired = issuer.token(subject="late", lifetime=-60)
    mix: list[tuple[float, str, str, dict[str, str]]] = []
    for token in tokens:
        mix.append((0.70 / SUBJECTS, "GET", f"/slurm/{version}/ping", {"Authorization": f"Bearer {token}"}))
        mix.append((0.05 / SUBJECTS, "DELETE", f"/slurm/{version}/job/1", {"Authorization": f"Bearer {token}"}))
    mix += [
        (0.10, "GET", f"/slurm/{version}/ping", {"Authorization": f"Bearer {hot}"}),
        (0.05, "GET", f"/slurm/{version}/jobs", {"Authorization": f"Bearer {expired}"}),
        (0.03, "GET", f"/slurm/{version}/jobs", {"Authorization": "Bearer not-a-token"}),
        (0.04, "GET", f"/slurm/{version}/ping/%2e%2e/jobs", {"Authorization": f"Bearer {tokens[0]}"}),
        (0.03, "GET", f"/slurm/{version}/ping", {}),
    ]
    return mix


class Connection:
    """One keep-alive HTTP/1.1 connection with pre-encoded requests: far cheaper than a client
    library, so that on a small machine the sender, not the proxy, is never the bottleneck."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, data: bytes) -> int:
        if self.writer is None or self.reader is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(data)
        head = (await self.reader.readuntil(b"\r\n\r\n")).lower()
        status = int(head[9:12])
        if b"transfer-encoding: chunked" in head:
            while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                await self.reader.readexactly(size + 2)
            await self.reader.readuntil(b"\r\n")
        else:
            marker = head.find(b"content-length: ")
            length = int(head[marker + 16 : head.index(b"\r\n", marker)]) if marker >= 0 else 0
            await self.reader.readexactly(length)
        if b"connection: close" in head:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def worker(port: int, queue: asyncio.Queue[tuple[float, bytes] | None], state: Soak, timeout: float) -> None:
    connection = Connection(port)
    while (item := await queue.get()) is not None:
        scheduled, data = item
        state.in_flight += 1
        try:
            async with asyncio.timeout(timeout):
                status = await connection.request(data)
            state.statuses[status] += 1
            state.answered += 1
            # From the scheduled time: waiting for a free connection counts (no coordinated omission).
            state.latencies.append((time.perf_counter() - scheduled) * 1000)
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
            state.errors[type(exc).__name__] += 1
            connection.close()
        finally:
            state.in_flight -= 1
    connection.close()


def encode(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: soak"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def audit_count(path: Path) -> int:
    """Records of answered requests in the audit file and in the files it was rotated to (audit.max_bytes):
    every line but the intent records that state-changing requests also get (one per request, then)."""
    total = 0
    for file in [*rotated_files(path), path]:
        try:
            with file.open("rb") as handle:
                total += sum(1 for line in handle if line.strip() and b'"kind":"intent"' not in line)
        except FileNotFoundError:
            continue
    return total


def sample(state: Soak, server: ProxyServer, t: float, last: dict[str, Any]) -> Window:
    assert server.proc is not None
    pids = process_tree(server.proc.pid)
    window = sorted(state.latencies[last["latencies"] :])
    statuses = {str(k): v - last["statuses"].get(k, 0) for k, v in state.statuses.items()}
    last.update(latencies=len(state.latencies), statuses=dict(state.statuses))
    open_files = sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids if os.path.isdir(f"/proc/{pid}/fd"))
    return Window(
        t=round(t, 1),
        sent=state.sent,
        answered=state.answered,
        errors=sum(state.errors.values()),
        statuses={k: v for k, v in statuses.items() if v},
        p50_ms=round(window[len(window) // 2], 2) if window else 0.0,
        p99_ms=round(window[int(len(window) * 0.99)], 2) if window else 0.0,
        max_ms=round(window[-1], 2) if window else 0.0,
        rss_mb=round(rss_bytes(pids) / 2**20, 1),
        open_files=open_files,
        audit_records=audit_count(server.audit_path),
    )


async def drive(
    server: ProxyServer, mix: list[tuple[float, str, str, dict[str, str]]], args: argparse.Namespace
) -> tuple[Soak, list[Window]]:
    state = Soak(rate=args.rate, duration=args.duration)
    weights = [m[0] for m in mix]
    encoded = [encode(method, path, headers) for _, method, path, headers in mix]
    rng = random.Random(8)  # a load mix, not a secret
    windows: list[Window] = []
    last: dict[str, Any] = {"latencies": 0, "statuses": {}}
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
    workers = [asyncio.create_task(worker(server.port, queue, state, args.timeout)) for _ in range(args.connections)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    start = time.perf_counter()
    next_sample = args.every
    while (now := time.perf_counter() - start) < args.duration and not stop.is_set():
        due = int(now * args.rate) + 1
        while state.sent < due:
            if queue.qsize() >= MAX_IN_FLIGHT:
                state.overruns += 1  # the proxy is not keeping up: shed rather than queue for ever
            else:
                queue.put_nowait((start + state.sent / args.rate, rng.choices(encoded, weights)[0]))
            state.sent += 1
        if now >= next_sample:
            windows.append(sample(state, server, now, last))
            print_window(windows[-1])
            next_sample += args.every
        await asyncio.sleep(0.002)
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.wait(workers, timeout=args.timeout + 10)
    windows.append(sample(state, server, time.perf_counter() - start, last))
    print_window(windows[-1])
    return state, windows


def print_window(w: Window) -> None:
    statuses = " ".join(f"{k}:{v}" for k, v in sorted(w.statuses.items()))
    print(
        f"t={w.t:7.1f}s sent={w.sent} answered={w.answered} errors={w.errors} p50={w.p50_ms}ms p99={w.p99_ms}ms "
        f"max={w.max_ms}ms rss={w.rss_mb}MB fds={w.open_files} audit={w.audit_records} [{statuses}]",
        flush=True,
    )


def summary(state: Soak, windows: list[Window], records: int, args: argparse.Namespace) -> dict[str, Any]:
    steady = windows[len(windows) // 3 :] if len(windows) >= 6 else windows
    first, final = steady[0].rss_mb, windows[-1].rss_mb
    latencies = sorted(state.latencies)
    return {
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "upstream": args.upstream,
        "sent": state.sent,
        "answered": state.answered,
        "client_errors": dict(state.errors),
        "overruns": state.overruns,
        "statuses": {str(k): v for k, v in sorted(state.statuses.items())},
        "audit_records": records,
        "lost_records": state.answered - records,
        "p50_ms": round(latencies[len(latencies) // 2], 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)], 2) if latencies else None,
        "max_ms": round(latencies[-1], 2) if latencies else None,
        "rss_mb_after_warmup": first,
        "rss_mb_end": final,
        "rss_growth_after_warmup_pct": round((final - first) / first * 100, 1) if first else None,
        "rss_mb_max": max(w.rss_mb for w in windows),
        "open_files_max": max(w.open_files for w in windows),
        "rss_slope_mb_per_min": slope([(w.t, w.rss_mb) for w in steady]),
    }


def slope(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 60, 3) if den else None


def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="slurmproxy-soak-", dir="/var/tmp"))
    workdir.chmod(0o755)
    nginx = Nginx.create(workdir / "nginx")
    issuer = BenchIssuer(workdir / "issuer", nginx.issuer_port)
    nginx.start(issuer.directory)
    slurm: SlurmCluster | None = None
    server: ProxyServer | None = None
    try:
        if args.upstream == "slurm":
            slurm = SlurmCluster(workdir / "slurm", args.generation).start()
            upstream, key, version = slurm.url, slurm.jwt_key_path, slurm.api_versions[-1]
        else:
            key = workdir / "jwt.key"
            key.write_bytes(os.urandom(32))
            upstream, version = f"http://127.0.0.1:{nginx.upstream_port}", "v0.0.38"
        config = {
            "oidc": {"issuers": [{"issuer": issuer.issuer, "audiences": [AUDIENCE]}]},
            "upstream": {"url": upstream, "auth": "mint", "jwt_key_file": str(key)},
            "identity": {"min_uid": 1000},
        }
        server = ProxyServer(workdir / "proxy", config, {"soak.yaml": soak_policy(issuer.issuer)}).start()
        mix = request_mix(issuer, version)
        print(f"soak: {args.rate}/s for {args.duration}s against {args.upstream} ({upstream}); workdir {workdir}")
        state, windows = asyncio.run(drive(server, mix, args))
        server.signal(signal.SIGTERM)
        assert server.proc is not None
        server.proc.wait(60)
        records = audit_count(server.audit_path)
    finally:
        if server is not None:
            server.stop()
        if slurm is not None:
            slurm.stop()
        nginx.stop()
    result = summary(state, windows, records, args)
    print("\n| figure | value |\n|---|---|")
    for name, value in result.items():
        print(f"| {name} | {value} |")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"soak-{stamp}.json"
    path.write_text(
        json.dumps({"summary": result, "windows": [asdict(w) for w in windows], "args": vars(args)}, indent=1)
    )
    print(f"\nresults: {path.relative_to(ROOT)}")
    return 0 if result["lost_records"] == 0 and not state.errors else 1


def main() -> int:
    parser = argparse.ArgumentParser(description="slurmproxy soak test")
    parser.add_argument("--rate", type=float, default=200, help="requests per second (default 200)")
    parser.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    parser.add_argument("--every", type=float, default=10, help="seconds between samples (default 10)")
    parser.add_argument("--timeout", type=float, default=30, help="client timeout per request (default 30)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    parser.add_argument("--upstream", choices=["slurm", "fast"], default="slurm")
    parser.add_argument("--generation", choices=["22.05", "24.11"], default="22.05")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
