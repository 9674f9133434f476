"""Single flight: concurrent callers that need the same thing share one computation.

:class:`SingleFlight` is the primitive: the first caller for a key starts the computation in a task
of its own, later callers for the same key wait on that task, and nobody's cancellation (a client
that goes away) cancels the computation the others wait for. Its exception is always retrieved, so
a failure that every waiter abandoned is never reported as lost.

:class:`SingleFlightCache` adds a bounded cache with per-entry expiry and cached failures on top:
200 concurrent first requests with one token make one userinfo call, and a refusal or a dependency
failure (any :class:`ProxyError`) is kept for ``failure_seconds`` so that a retry storm does not
become a storm at the provider. Everything else (a bug) propagates and is not cached. Failures live
in a cache of their own, so a flood of bad tokens can never evict the good ones.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar

from cachetools import TLRUCache

from slurmproxy.errors import ProxyError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def fresh(error: ProxyError) -> ProxyError:
    """A new instance per raise: re-raising one shared instance would grow its traceback without bound."""
    clone = copy.copy(error)
    clone.__traceback__ = None
    clone.__cause__ = clone.__context__ = None
    return clone


class SingleFlight(Generic[K, V]):
    """One computation per key at a time, shared by every concurrent caller."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, key: K) -> bool:
        return key in self._tasks

    def task(self, key: K, start: Callable[[], Awaitable[V]], *, share: bool = True) -> tuple[asyncio.Task[V], bool]:
        """The task computing ``key`` and whether this call started it. With ``share=False`` a new task is
        always started (still in its own task, so the caller's cancellation does not cancel it) and not
        offered to later callers."""
        task = self._tasks.get(key) if share else None
        if task is not None:
            return task, False
        task = asyncio.get_running_loop().create_task(_await(start))
        task.add_done_callback(partial(self._done, key) if share else _retrieve)
        if share:
            self._tasks[key] = task
        return task, True

    async def run(self, key: K, start: Callable[[], Awaitable[V]]) -> V:
        """The result of the computation for ``key``: this caller's own, or the one already in flight."""
        task, _ = self.task(key, start)
        return await asyncio.shield(task)

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        _retrieve(task)

    async def aclose(self) -> None:
        """Cancel every computation in flight and wait for them to end."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _await(start: Callable[[], Awaitable[V]]) -> V:
    return await start()


def _retrieve(task: asyncio.Task[object]) -> None:
    # Mark the exception as retrieved: when every waiter has gone, asyncio would log it otherwise.
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True, slots=True)
class _Entry(Generic[V]):
    value: V | None
    error: ProxyError | None
    expires_at: float


def _expiry(_key: object, entry: _Entry[V], _now: float) -> float:
    return entry.expires_at


class SingleFlightCache(Generic[K, V]):
    def __init__(self, maxsize: int, *, failure_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._failure_seconds = failure_seconds
        self._entries: TLRUCache[K, _Entry[V]] = TLRUCache(maxsize, _expiry, timer=clock)
        self._failures: TLRUCache[K, _Entry[V]] = TLRUCache(maxsize, _expiry, timer=clock)
        self._flight: SingleFlight[K, V] = SingleFlight()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def in_flight(self) -> int:
        return len(self._flight)

    def computing(self, key: K) -> bool:
        """Whether ``key`` is being computed now (a caller of :meth:`compute` would join it)."""
        return key in self._flight

    def get(self, key: K) -> V | None:
        """The cached value, None on a miss; raises a cached failure."""
        try:
            return self._entries[key].value  # TLRUCache: [] is 3x faster than .get() on a hit
        except KeyError:
            pass
        failure = self._failures.get(key) if self._failures else None
        if failure is not None and failure.error is not None:
            raise fresh(failure.error)
        return None

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)
        self._failures.pop(key, None)

    async def compute(self, key: K, compute: Callable[[], Awaitable[tuple[V, float]]]) -> V:
        """Run ``compute`` (returning the value and its expiry time) once for all concurrent callers."""
        try:
            return await self._flight.run(key, lambda: self._run(key, compute))
        except ProxyError as error:
            raise fresh(error) from None

    async def _run(self, key: K, compute: Callable[[], Awaitable[tuple[V, float]]]) -> V:
        try:
            value, expires_at = await compute()
        except ProxyError as error:
            if self._failure_seconds > 0:
                self._failures[key] = _Entry(None, fresh(error), self._clock() + self._failure_seconds)
            raise
        self._entries[key] = _Entry(value, None, expires_at)  # not stored when already expired
        self._failures.pop(key, None)
        return value

    async def aclose(self) -> None:
        await self._flight.aclose()
