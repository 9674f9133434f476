"""Audit lines written off the event loop, by one thread per process, with a bounded queue.

A write to the audit sink can block: a stdout pipe whose reader stalls (a log collector that fell
behind), a disk that hangs. Written on the event loop, one such write froze the whole worker. Here
the loop hands each line to a writer thread and awaits the outcome; the loop never waits on the sink.

The outcome of every line is certain, because the proxy answers only after it is known:

* written: the awaiting request goes on;
* the write failed (``OSError``): raised to the awaiting request;
* the queue is full (``max_queued`` lines waiting: the sink cannot keep up), or the line waited
  ``wait_seconds`` without its write having started: raised, and the line is **never** written
  (it is taken out of the queue), so no record claims an answer the client never got.

A line whose write has started is awaited until that write returns: its outcome is the write's.
While a sink stalls, that one request waits; every other record fails within ``wait_seconds`` (with
``audit.fail_closed``, a 503 before anything is forwarded), and the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass


class QueueFull(OSError):
    """The writer cannot keep up: the line was not queued (and will not be written)."""


class NotStarted(OSError):
    """The line waited too long for its write to start; it was withdrawn (and will not be written)."""


@dataclass(eq=False)
class _Line:
    data: bytes
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[None] | None = None  # awaited by write()
    on_error: Callable[[OSError], None] | None = None  # or told, in the writer thread (post())
    started: bool = False


def _settle(future: asyncio.Future[None], error: OSError | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class AuditWriter:
    """Writes lines with ``sink`` in its own thread, in the order they were queued."""

    def __init__(self, sink: Callable[[bytes], None], *, max_queued: int, wait_seconds: float) -> None:
        self._sink = sink
        self._max = max_queued
        self._wait = wait_seconds
        self._queue: collections.deque[_Line] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def _enqueue(self, line: _Line) -> None:
        with self._cond:
            if self._stopping:
                raise OSError("the audit writer is closed")
            if len(self._queue) >= self._max:
                raise QueueFull(f"the audit writer cannot keep up ({self._max} records waiting)")
            self._queue.append(line)
            self._cond.notify()

    async def write(self, data: bytes) -> None:
        """Return once ``data`` is written; raise OSError if it is not (and then it never will be)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        line = _Line(data, loop, future)
        self._enqueue(line)
        timer = loop.call_later(self._wait, self._withdraw, line)  # one timer, no task: this runs per request
        try:
            await future
        finally:
            timer.cancel()

    def _withdraw(self, line: _Line) -> None:
        """On the loop, ``wait_seconds`` after queueing: a line whose write has not started is taken out
        and fails; one whose write has started keeps waiting for it (its outcome is the write's)."""
        with self._cond:
            if line.started:
                return
            self._queue.remove(line)
        if line.future is not None:
            _settle(line.future, NotStarted(f"the audit record was not written within {self._wait:g} s"))

    def post(self, data: bytes, on_error: Callable[[OSError], None]) -> None:
        """Queue ``data`` without waiting (for callers that cannot await); ``on_error`` is called, in the
        writer thread, if it is not written."""
        try:
            self._enqueue(_Line(data, on_error=on_error))
        except OSError as exc:
            on_error(exc)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                line = self._queue.popleft()
                line.started = True
            error: OSError | None = None
            try:
                self._sink(line.data)
            except OSError as exc:
                error = exc
            except Exception as exc:  # a bug in the sink: the record is not written, and says so
                error = OSError(f"{type(exc).__name__}: {exc}")
            if line.future is not None and line.loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                    line.loop.call_soon_threadsafe(_settle, line.future, error)
            elif error is not None and line.on_error is not None:
                line.on_error(error)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for at most ``timeout``), then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
