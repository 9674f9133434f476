"""Every call to Redis or PostgreSQL goes through a :class:`Guard`: bounded in time, and remembered when it fails.

* **Bounded**: a call (waiting for a pooled connection included) gets at most the backend's
  ``timeout_seconds``; then the caller stops waiting and the call counts as a failure. No request
  waits longer on state.
* **Remembered**: after a failure the backend is *down*: calls fail at once, without a network round
  trip, so an outage costs requests no time. A background probe (the backend's cheapest question:
  ``PING``, ``SELECT 1``) asks every ``state.retry_seconds``; when it answers, the backend is up again
  and the log says so. Recovery needs no restart, and no request pays for finding out.

A failure is raised as :class:`BackendDown` (``kind``: ``timeout``, ``unreachable``, ``error`` or
``down``, the last for calls refused while the backend is down); each user of the state turns it
into the behaviour the admin chose, and counts it in ``slurmproxy_state_errors{backend, use, kind}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from slurmproxy.observability.metrics import Metrics

logger = logging.getLogger("slurmproxy.state")
T = TypeVar("T")
Classifier = Callable[[BaseException], str | None]
"""``timeout``, ``unreachable`` or ``error`` for an exception of the backend's client; None: not the backend's."""


class BackendDown(Exception):
    """A shared-state backend did not answer usably. ``detail`` is safe to show (no address, no secret)."""

    def __init__(self, backend: str, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.backend = backend
        self.kind = kind
        self.detail = detail


class Guard:
    def __init__(
        self,
        backend: str,
        *,
        timeout: float,
        retry_seconds: float,
        classify: Classifier,
        metrics: Metrics | None = None,
        probe: Callable[[], Awaitable[object]] | None = None,
        detach: bool = False,
    ) -> None:
        self.backend = backend
        self.detach = detach  # run each call in its own task (for clients whose cancellation itself may wait)
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.probe = probe  # without one, the first call after retry_seconds tries the backend again
        self._classify = classify
        self._metrics = metrics
        self._down_kind: str | None = None
        self._down_until = 0.0
        self._prober: asyncio.Task[None] | None = None

    @property
    def down(self) -> bool:
        return self._down_kind is not None and (self.probe is not None or time.monotonic() < self._down_until)

    async def call(self, use: str, operation: Callable[[], Awaitable[T]]) -> T:
        """``operation()``'s result, or BackendDown within ``timeout`` seconds."""
        if self.down:
            self._count(use, "down")
            raise BackendDown(self.backend, "down", self._describe(self._down_kind or "error", recent=True))
        started = time.monotonic()
        try:
            result = await self._bounded(operation)
        except BackendDown as failure:
            self._failed(use, failure)
            raise
        self._up()
        if self._metrics is not None:
            self._metrics.state_call(self.backend, time.monotonic() - started)
        return result

    async def _bounded(self, operation: Callable[[], Awaitable[T]]) -> T:
        if not self.detach:  # redis-py drops a connection whose command was cancelled, at once
            try:
                async with asyncio.timeout(self.timeout):
                    return await operation()
            except TimeoutError as exc:
                raise BackendDown(self.backend, "timeout", self._describe("timeout")) from exc
            except Exception as exc:
                kind = self._classify(exc)
                if kind is None:
                    raise
                raise BackendDown(self.backend, kind, self._describe(kind)) from exc
        # The operation runs in its own task, and the caller stops waiting for it at the deadline: a client's
        # own clean-up after a cancellation (psycopg asks the server to cancel the query, up to 10 s more)
        # then happens in the background instead of in the request.
        task = asyncio.ensure_future(operation())
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout)
        except asyncio.CancelledError:
            task.cancel()
            task.add_done_callback(_consume)
            raise
        if not done:
            task.cancel()
            task.add_done_callback(_consume)
            raise BackendDown(self.backend, "timeout", self._describe("timeout"))
        try:
            return task.result()
        except Exception as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else self._classify(exc)
            if kind is None:
                raise
            raise BackendDown(self.backend, kind, self._describe(kind)) from exc

    def _failed(self, use: str, failure: BackendDown) -> None:
        if self._down_kind is None:
            cause = failure.__cause__
            logger.error(
                "%s failed (%s%s); requests get the outage behaviour until it answers again",
                self.backend,
                failure.kind,
                f", {type(cause).__name__}: {str(cause)[:200]}" if cause is not None else "",
            )
        self._down_kind = failure.kind
        self._down_until = time.monotonic() + self.retry_seconds
        self._count(use, failure.kind)
        if self.probe is not None and (self._prober is None or self._prober.done()):
            self._prober = asyncio.get_running_loop().create_task(self._probe_until_up(self.probe))

    def _up(self) -> None:
        if self._down_kind is not None:
            logger.warning("%s answers again: using it", self.backend)
            self._down_kind = None

    async def _probe_until_up(self, probe: Callable[[], Awaitable[object]]) -> None:
        while self._down_kind is not None:
            await asyncio.sleep(self.retry_seconds)
            try:
                await self._bounded(probe)
            except BackendDown:
                continue
            except Exception:  # not the backend's kind of failure: keep probing, never stay down for good
                logger.exception("%s: the probe failed unexpectedly", self.backend)
                continue
            self._up()

    async def aclose(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)

    def _describe(self, kind: str, *, recent: bool = False) -> str:
        what = {
            "timeout": f"did not answer within {self.timeout:g} s",
            "unreachable": "is unreachable",
            "error": "failed",
        }.get(kind, "failed")
        if recent:  # not asked: the last call failed, and the probe has not seen it answer since
            return f"{self.backend} is down (it {what.replace('is unreachable', 'was unreachable')})"
        return f"{self.backend} {what}"

    def _count(self, use: str, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.state_error(self.backend, use, kind)


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned operation's outcome, so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()
