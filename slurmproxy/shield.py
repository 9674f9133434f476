"""The polling shield: fewer slurmctld RPCs when tools poll job state.

Two mechanisms, both keyed on the **local account** the request is forwarded as, the method, the
canonical path and the query string (slurmrestd's answer depends only on those: the Slurm
identity in the credential, and the request):

* **coalescing** (on by default): concurrent identical GETs share one upstream request; every
  waiter gets the same status, headers and body, and every request still gets its own audit
  record;
* **a short response cache** (off by default): per path pattern, a TTL of a few seconds; only 200
  answers are kept, never served after their TTL, never across local accounts.

Bodies are buffered to be shared, up to ``max_body_bytes``; a larger answer is streamed to the
request that fetched it and the others fetch their own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from cachetools import TTLCache

from slurmproxy.policy.operations import compile_path
from slurmproxy.settings import ShieldSettings
from slurmproxy.upstream import UpstreamResponse

Key = tuple[str, str, str, bytes]
Source = Literal["upstream", "coalesced", "cache"]
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class SharedResponse:
    status_code: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    fetched_at: float


@dataclass(frozen=True, slots=True)
class ShieldResult:
    """Either a shared (buffered) answer, or the leader's own stream when it was too large to share."""

    source: Source
    shared: SharedResponse | None = None
    stream: UpstreamResponse | None = None
    age: float = 0.0


@dataclass(frozen=True)
class CacheRule:
    pattern: str
    ttl_seconds: float


def shield_from(settings: ShieldSettings) -> Shield:
    return Shield(
        [CacheRule(rule.path, rule.ttl_seconds) for rule in settings.cache],
        coalesce=settings.coalesce,
        max_entries=settings.max_entries,
        max_body_bytes=settings.max_body_bytes,
    )


class Shield:
    def __init__(
        self,
        cache_rules: list[CacheRule] | None = None,
        *,
        coalesce: bool = True,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rules = [(compile_path(r.pattern), r.ttl_seconds) for r in cache_rules or []]
        self._coalesce = coalesce
        self._max_body = max_body_bytes
        self._clock = clock
        longest = max((ttl for _, ttl in self._rules), default=1.0)
        self._cache: TTLCache[Key, SharedResponse] = TTLCache(maxsize=max_entries, ttl=longest, timer=clock)
        self._inflight: dict[Key, asyncio.Task[SharedResponse | UpstreamResponse]] = {}
        self.upstream_requests = 0
        self.coalesced = 0
        self.cache_hits = 0

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
                self.cache_hits += 1
                return ShieldResult("cache", shared=hit, age=now - hit.fetched_at)
        pending = self._inflight.get(key)
        if pending is not None:
            result = await asyncio.shield(pending)
            if isinstance(result, UpstreamResponse):  # too large to share: the leader streams it
                self.upstream_requests += 1
                return ShieldResult("upstream", stream=await send())
            self.coalesced += 1
            return ShieldResult("coalesced", shared=result)
        return await self._lead(key, ttl, send)

    async def _produce(
        self, ttl: float | None, key: Key, send: Callable[[], Awaitable[UpstreamResponse]]
    ) -> SharedResponse | UpstreamResponse:
        self.upstream_requests += 1
        response = await send()
        length = _content_length(response)
        if length is not None and length > self._max_body:
            return response
        try:
            body = await response.body(self._max_body)
        finally:
            await response.aclose()
        shared = SharedResponse(response.status_code, response.headers, body, self._clock())
        if ttl is not None and shared.status_code == 200:
            self._cache[key] = shared
        return shared

    async def _lead(self, key: Key, ttl: float | None, send: Callable[[], Awaitable[UpstreamResponse]]) -> ShieldResult:
        # The fetch runs in its own task: if this request is cancelled (its client went away), the
        # requests waiting on the same answer still get it.
        task = asyncio.create_task(self._produce(ttl, key, send))
        if self._coalesce:
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_close_unclaimed)
            raise
        if isinstance(result, UpstreamResponse):
            return ShieldResult("upstream", stream=result)
        return ShieldResult("upstream", shared=result)

    def _forget(self, key: Key, task: asyncio.Task[SharedResponse | UpstreamResponse]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone


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
