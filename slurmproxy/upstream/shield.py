"""The polling shield: fewer slurmctld RPCs when tools poll job state.

Two mechanisms, both keyed on the **local account** the request is forwarded as, the method, the
canonical path, the query string and the request headers that are forwarded (all but a few that
cannot change slurmrestd's answer, such as User-Agent): slurmrestd's answer depends only on the
Slurm identity in the credential and on the request.

* **coalescing** (on by default): concurrent identical GETs without a body share one upstream
  request; every waiter gets the same status, headers and body, and every request still gets its
  own audit record;
* **a short response cache** (off by default): per path pattern, a TTL of a few seconds; only 200
  answers are kept, never served once older than their TTL (counted from when the request was
  sent), never across local accounts.

Bodies are buffered to be shared, each up to ``max_body_bytes`` and all together (being read,
shared, sent or cached) up to ``max_bytes``; an answer that does not fit is streamed to the request
that fetched it, and the others fetch their own.

The cache can also have a second tier shared by every replica (:class:`SharedCache`, in Redis with
``state.backend: shared``; see ``slurmproxy.state.shield``): on a miss here, the request that
fetches asks it before slurmrestd, and an answer fetched from slurmrestd is written to it with what
is left of its TTL. Same key, same limits: an answer from the shared tier is held in this worker's
budget like any other, and only answers that fit ``max_body_bytes`` are ever written there.
Coalescing stays per worker.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from cachetools import TTLCache

from slurmproxy.config.settings import ShieldSettings
from slurmproxy.core.flight import SingleFlight
from slurmproxy.core.slurmrest import compile_path
from slurmproxy.upstream.exchange import UpstreamResponse

Key = tuple[str, str, str, bytes, bytes]
"""Local account, method, canonical path, query string, and the forwarded request headers (see :func:`variant`)."""
Source = Literal["upstream", "coalesced", "cache"]
# Forwarded request headers that cannot change slurmrestd's answer; every other one is part of the key.
_INVARIANT_HEADERS = frozenset({b"user-agent", b"x-request-id", b"traceparent", b"tracestate"})


def variant(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request headers that go into the key: all forwarded ones except the invariant few, in order."""
    return b"\n".join(k.lower() + b":" + v for k, v in headers if k.lower() not in _INVARIANT_HEADERS)


class ByteBudget:
    """Bytes of answer bodies held by the shield; a body gives its bytes back when the last reference goes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def free(self) -> int:
        return max(0, self.limit - self.used)

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


@dataclass(frozen=True, slots=True, weakref_slot=True)
class SharedResponse:
    status_code: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    fetched_at: float  # when the request was sent: the answer is at least as fresh as that
    from_shared_cache: bool = False


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """An answer from the shared cache tier, and how long ago it was fetched from slurmrestd."""

    status_code: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    age: float


class SharedCache(Protocol):
    """A cache tier every replica sees (the shield's own cache is per worker)."""

    async def get(self, key: Key) -> CachedAnswer | None:
        """The answer for ``key`` if it is still within its TTL; None on a miss, and (when the admin chose
        so) when the tier fails; raises a DependencyError when the admin chose to refuse then."""

    async def put(self, key: Key, response: SharedResponse, ttl: float) -> None:
        """Keep ``response`` for ``ttl`` more seconds; never raises."""


@dataclass(frozen=True, slots=True)
class ShieldResult:
    """Either a shared (buffered) answer, or the leader's own stream when it was too large to share."""

    source: Source
    shared: SharedResponse | None = None
    stream: UpstreamResponse | None = None
    age: float = 0.0


class Shield:
    def __init__(
        self,
        settings: ShieldSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedCache | None = None,
    ) -> None:
        self._shared = shared
        self._rules = [(compile_path(r.path), r.ttl_seconds) for r in settings.cache]
        self._coalesce = settings.coalesce
        self._max_body = settings.max_body_bytes
        self.budget = ByteBudget(settings.max_bytes)
        self._clock = clock
        longest = max((ttl for _, ttl in self._rules), default=1.0)
        self._cache: TTLCache[Key, SharedResponse] = TTLCache(maxsize=settings.max_entries, ttl=longest, timer=clock)
        self._flight: SingleFlight[Key, SharedResponse | UpstreamResponse] = SingleFlight()

    def ttl_for(self, path: str) -> float | None:
        for regex, ttl in self._rules:
            if regex.fullmatch(path):
                return ttl
        return None

    def applies(self, method: str, path: str) -> bool:
        return method == "GET" and (self._coalesce or self.ttl_for(path) is not None)

    async def fetch(self, key: Key, send: Callable[[], Awaitable[UpstreamResponse]]) -> ShieldResult:
        """The answer for ``key``: from the cache, from a request in flight, or from a new upstream request."""
        ttl = self.ttl_for(key[2])
        now = self._clock()
        if ttl is not None:
            hit = self._cache.get(key)
            if hit is not None and now - hit.fetched_at < ttl:
                return ShieldResult("cache", shared=hit, age=now - hit.fetched_at)
        # The fetch runs in its own task: if the request that started it is cancelled (its client went
        # away), the requests waiting on the same answer still get it.
        task, leader = self._flight.task(key, lambda: self._produce(ttl, key, send), share=self._coalesce)
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if leader:
                task.add_done_callback(_close_unclaimed)
            raise
        if isinstance(result, SharedResponse) and result.from_shared_cache:
            return ShieldResult("cache", shared=result, age=max(0.0, self._clock() - result.fetched_at))
        if leader:
            if isinstance(result, UpstreamResponse):
                return ShieldResult("upstream", stream=result)
            return ShieldResult("upstream", shared=result)
        if isinstance(result, UpstreamResponse):  # too large to share: the leader streams it
            return ShieldResult("upstream", stream=await send())
        return ShieldResult("coalesced", shared=result)

    def _room(self, size: int) -> bool:
        if self.budget.take(size):
            return True
        self._cache.expire()  # answers past their TTL give their bytes back
        return self.budget.take(size)

    async def _from_shared(self, ttl: float, key: Key) -> SharedResponse | None:
        assert self._shared is not None
        answer = await self._shared.get(key)
        if answer is None or answer.age >= ttl or len(answer.body) > self._max_body or not self._room(len(answer.body)):
            return None
        shared = SharedResponse(
            answer.status_code, answer.headers, answer.body, self._clock() - answer.age, from_shared_cache=True
        )
        weakref.finalize(shared, self.budget.give, len(answer.body))
        self._cache[key] = shared
        return shared

    async def _produce(
        self, ttl: float | None, key: Key, send: Callable[[], Awaitable[UpstreamResponse]]
    ) -> SharedResponse | UpstreamResponse:
        if ttl is not None and self._shared is not None:
            hit = await self._from_shared(ttl, key)
            if hit is not None:
                return hit
        sent_at = self._clock()
        response = await send()
        length = _content_length(response)
        if length is not None:
            if length > self._max_body or not self._room(length):
                return response  # streamed to its own request: as if there were no shield
            try:
                body = await response.body(length)
            except BaseException:
                self.budget.give(length)
                raise
            finally:
                await response.aclose()
            self.budget.give(length - len(body))
        else:
            self._cache.expire()
            peeked = await response.peek(min(self._max_body, self.budget.free()))
            if peeked is None:
                return response  # too large, or no room: streamed, the bytes read so far first
            await response.aclose()
            body = peeked
            self.budget.used += len(body)  # may pass the limit by what concurrent unsized answers read
        shared = SharedResponse(response.status_code, response.headers, body, sent_at)
        weakref.finalize(shared, self.budget.give, len(body))
        if ttl is not None and shared.status_code == 200:
            self._cache[key] = shared
            left = ttl - (self._clock() - sent_at)
            if self._shared is not None and left > 0:
                await self._shared.put(key, shared, left)
        return shared


def _close_unclaimed(task: asyncio.Task[SharedResponse | UpstreamResponse]) -> None:
    if not task.cancelled() and task.exception() is None:
        result = task.result()
        if isinstance(result, UpstreamResponse):
            asyncio.get_running_loop().create_task(result.aclose())


def _content_length(response: UpstreamResponse) -> int | None:
    for name, value in response.headers:
        if name.lower() == b"content-length" and value.isdigit():
            return int(value)
    return None
