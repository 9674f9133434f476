"""A bounded cache with per-entry expiry, cached failures, and single flight for misses.

Many concurrent requests for the same missing key share one computation (one userinfo or
introspection call for 200 concurrent first requests with the same token). A successful result is
kept until the expiry the computation returns; a refusal or a dependency failure (any
:class:`ProxyError`) is kept for ``failure_seconds`` so that a retry storm does not become a storm
at the provider. Everything else (a bug) propagates and is not cached. Failures live in a cache
of their own, so a flood of bad tokens can never evict the good ones.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from cachetools import TLRUCache

from slurmproxy.errors import ProxyError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[V]):
    value: V | None
    error: ProxyError | None
    expires_at: float


def _expiry(_key: object, entry: _Entry[V], _now: float) -> float:
    return entry.expires_at


def _fresh(error: ProxyError) -> ProxyError:
    """A new instance per raise: re-raising one instance would grow its traceback without bound."""
    clone = copy.copy(error)
    clone.__traceback__ = None
    clone.__cause__ = clone.__context__ = None
    return clone


class SingleFlightCache(Generic[K, V]):
    def __init__(self, maxsize: int, *, failure_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._failure_seconds = failure_seconds
        self._entries: TLRUCache[K, _Entry[V]] = TLRUCache(maxsize, _expiry, timer=clock)
        self._failures: TLRUCache[K, _Entry[V]] = TLRUCache(maxsize, _expiry, timer=clock)
        self._flights: dict[K, asyncio.Task[V]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def get(self, key: K) -> V | None:
        """The cached value, None on a miss; raises a cached failure."""
        try:
            return self._entries[key].value  # TLRUCache: [] is 3x faster than .get() on a hit
        except KeyError:
            pass
        failure = self._failures.get(key) if self._failures else None
        if failure is not None and failure.error is not None:
            raise _fresh(failure.error)
        return None

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)
        self._failures.pop(key, None)

    async def compute(self, key: K, compute: Callable[[], Awaitable[tuple[V, float]]]) -> V:
        """Run ``compute`` (returning the value and its expiry time) once for all concurrent callers."""
        task = self._flights.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._run(key, compute))
            task.add_done_callback(_retrieve)
            self._flights[key] = task
        try:
            # shield: a caller that goes away does not cancel the computation the others wait for.
            return await asyncio.shield(task)
        except ProxyError as error:
            raise _fresh(error) from None

    async def _run(self, key: K, compute: Callable[[], Awaitable[tuple[V, float]]]) -> V:
        try:
            value, expires_at = await compute()
        except ProxyError as error:
            if self._failure_seconds > 0:
                self._failures[key] = _Entry(None, _fresh(error), self._clock() + self._failure_seconds)
            raise
        finally:
            self._flights.pop(key, None)
        self._entries[key] = _Entry(value, None, expires_at)  # not stored when already expired
        self._failures.pop(key, None)
        return value

    async def aclose(self) -> None:
        tasks = list(self._flights.values())
        self._flights.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _retrieve(task: asyncio.Task[object]) -> None:
    # Mark the exception as retrieved: when every waiter has gone, asyncio would log it otherwise.
    if not task.cancelled():
        task.exception()
