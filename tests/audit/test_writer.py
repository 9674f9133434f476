"""The audit writer thread: the loop never waits on the sink, and each line's fate is certain."""

from __future__ import annotations

import asyncio
import threading

import pytest

from slurmproxy.audit.writer import AuditWriter, NotStarted, QueueFull

pytestmark = pytest.mark.anyio


class GatedSink:
    """Takes lines into ``written``; the first one waits for ``gate`` (a stalled pipe)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.written: list[bytes] = []

    def __call__(self, line: bytes) -> None:
        if not self.written:
            self.entered.set()
            self.gate.wait(60)
        if line == b"broken\n":
            raise OSError(5, "Input/output error")
        self.written.append(line)


async def test_a_stalled_write_holds_only_its_own_line() -> None:
    sink = GatedSink()
    writer = AuditWriter(sink, max_queued=2, wait_seconds=0.2)
    try:
        first = asyncio.create_task(writer.write(b"first\n"))
        assert await asyncio.to_thread(sink.entered.wait, 30)  # its write has started, and stalls
        with pytest.raises(NotStarted):  # queued behind it: withdrawn after wait_seconds
            await writer.write(b"second\n")
        await asyncio.sleep(0)  # the loop runs meanwhile: nothing above blocked it
        assert not first.done()
        sink.gate.set()
        await asyncio.wait_for(first, 30)  # its outcome is its write's
        await writer.write(b"third\n")
    finally:
        sink.gate.set()
        writer.close()
    assert sink.written == [b"first\n", b"third\n"]  # the withdrawn line is never written


async def test_a_full_queue_refuses_at_once_and_failures_reach_the_caller() -> None:
    sink = GatedSink()
    writer = AuditWriter(sink, max_queued=1, wait_seconds=30)
    try:
        first = asyncio.create_task(writer.write(b"first\n"))
        assert await asyncio.to_thread(sink.entered.wait, 30)
        queued = asyncio.create_task(writer.write(b"queued\n"))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await writer.write(b"no room\n")
        sink.gate.set()
        await asyncio.wait_for(asyncio.gather(first, queued), 30)
        with pytest.raises(OSError, match="Input/output error"):
            await writer.write(b"broken\n")
    finally:
        sink.gate.set()
        writer.close()
    assert sink.written == [b"first\n", b"queued\n"]


def test_posted_lines_are_written_and_their_failures_reported() -> None:
    sink = GatedSink()
    sink.gate.set()
    writer = AuditWriter(sink, max_queued=8, wait_seconds=1)
    errors: list[OSError] = []
    writer.post(b"refused connection\n", errors.append)
    writer.post(b"broken\n", errors.append)
    writer.close()  # writes what is queued first
    assert sink.written == [b"refused connection\n"]
    assert [e.errno for e in errors] == [5]
