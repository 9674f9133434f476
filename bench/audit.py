"""The cost of writing one audit record, on the event loop before issue 15 and through the writer thread now.

    .venv/bin/python -m bench.audit [--quick]

Writes typical allowed-request records to a file in a scratch directory (the file sink, with size
rotation as configured by default) and to a pipe that a thread drains (the stdout sink's situation),
and times, per record: building the line alone; ``AuditLog.emit`` (the write on the calling thread,
as every record was written before); ``AuditLog.write`` awaited one at a time (a lone request); and
``AuditLog.write`` from 64 concurrent tasks (a busy worker: the thread writes while the loop goes on).
Prints a table; asserts nothing (speed targets live here, never in tests).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from tempfile import TemporaryDirectory

from slurmproxy.audit.log import AuditLog
from slurmproxy.audit.record import AuditRecord
from slurmproxy.config.settings import AuditSettings


def record(n: int) -> AuditRecord:
    r = AuditRecord.begin(f"bench-{n}", "POST", "/slurm/v0.0.42/job/submit", client="203.0.113.5")
    r.issuer, r.subject = "https://aai.egi.eu/auth/realms/egi", "0123456789abcdef@egi.eu"
    r.vos, r.vo = ["vo.example.org"], "vo.example.org"
    r.entitlement = "urn:mace:egi.eu:group:vo.example.org:role=member#aai.egi.eu"
    r.rule, r.operation, r.mapping, r.local_user = "vo-example-members", "submit", "table:users", "alice"
    r.allow(200)
    r.upstream_status, r.job_id, r.kind = 200, 4711 + n, "outcome"
    return r


def per_record(seconds: float, count: int) -> float:
    return seconds / count * 1e6


def median_of(runs: int, once: Callable[[], float]) -> float:
    return statistics.median(once() for _ in range(runs))


def sync_emit(log: AuditLog, count: int) -> float:
    records = [record(n) for n in range(count)]
    started = time.perf_counter()
    for r in records:
        log.emit(r)
    return per_record(time.perf_counter() - started, count)


def build_only(count: int) -> float:
    records = [record(n) for n in range(count)]
    started = time.perf_counter()
    for r in records:
        r.to_line()
    return per_record(time.perf_counter() - started, count)


async def awaited_one_by_one(log: AuditLog, count: int) -> float:
    records = [record(n) for n in range(count)]
    started = time.perf_counter()
    for r in records:
        await log.write(r)
    return per_record(time.perf_counter() - started, count)


async def awaited_concurrently(log: AuditLog, count: int, tasks: int = 64, *, cpu: bool = False) -> float:
    """Wall time per record, or (``cpu``) the event loop thread's own CPU time per record."""
    records = [record(n) for n in range(count)]
    queue = iter(records)

    async def worker() -> None:
        for r in queue:
            await log.write(r)

    started, started_cpu = time.perf_counter(), time.thread_time()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    if cpu:
        return per_record(time.thread_time() - started_cpu, count)
    return per_record(time.perf_counter() - started, count)


def sync_emit_cpu(log: AuditLog, count: int) -> float:
    records = [record(n) for n in range(count)]
    started = time.thread_time()
    for r in records:
        log.emit(r)
    return per_record(time.thread_time() - started, count)


def run_async(make: Callable[[], Awaitable[float]]) -> float:
    return asyncio.run(make())  # type: ignore[arg-type]


def drained_pipe() -> tuple[Path, threading.Thread, threading.Event]:
    """A FIFO with a reader that keeps up (as a log collector does)."""
    directory = Path(TemporaryDirectory(prefix="bench-audit-fifo-").name)
    directory.mkdir(parents=True, exist_ok=True)
    fifo = directory / "audit.fifo"
    os.mkfifo(fifo)
    stop = threading.Event()
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)

    def drain() -> None:
        while not stop.is_set():
            try:
                os.read(reader, 1 << 20)
            except BlockingIOError:
                stop.wait(0.0005)
        os.close(reader)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    return fifo, thread, stop


def measure(label: str, settings: AuditSettings, count: int, runs: int) -> None:
    log = AuditLog(settings)
    log.open()
    try:
        rows = [
            ("emit on the calling thread (before)", median_of(runs, lambda: sync_emit(log, count))),
            ("  of which that thread's CPU", median_of(runs, lambda: sync_emit_cpu(log, count))),
            (
                "write, awaited one at a time",
                median_of(runs, lambda: run_async(lambda: awaited_one_by_one(log, count))),
            ),
            ("write, 64 tasks at once", median_of(runs, lambda: run_async(lambda: awaited_concurrently(log, count)))),
            (
                "  of which the event loop's CPU",
                median_of(runs, lambda: run_async(lambda: awaited_concurrently(log, count, cpu=True))),
            ),
        ]
    finally:
        log.close()
    print(f"{label}:")
    for name, micros in rows:
        print(f"  {name:<40} {micros:8.1f} µs per record")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer records and runs")
    args = parser.parse_args()
    count, runs = (2000, 3) if args.quick else (20000, 5)
    print(f"audit records ({count} per run, median of {runs} runs)")
    print(f"  building the line alone                  {median_of(runs, lambda: build_only(count)):8.1f} µs per record")
    with TemporaryDirectory(prefix="bench-audit-") as scratch:
        measure(
            "file sink (rotation at 100 MiB)", AuditSettings(sink="file", file=Path(scratch) / "audit.log"), count, runs
        )
    fifo, thread, stop = drained_pipe()
    try:
        measure("a pipe, drained by a reader", AuditSettings(sink="file", file=fifo, max_bytes=0), count, runs)
    finally:
        stop.set()
        thread.join(5)


if __name__ == "__main__":
    main()
