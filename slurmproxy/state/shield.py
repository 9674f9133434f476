"""The shield's response cache shared by every replica: cached answers in Redis, per local account.

The key is the shield's own (local account, method, canonical path, query, forwarded headers), as
``<prefix>shield:<HMAC of those>``. The value is the answer's status, headers and the wall-clock time
its request was sent (one JSON line), then the body. Redis expires it when its TTL is over (``PX``
set to what was left of the TTL when it was written), so an answer is never served older than its
rule's TTL, from any replica. Only answers the shield already holds in memory go there: 200s of
cached paths, within ``shield.max_body_bytes``.

When Redis fails (``state.shield_outage``): ``local`` serves cached paths from each worker's own
cache, as the embedded backend does; ``fail_closed`` answers 503 ``shield_cache_unavailable``.
A failed write is only logged and counted.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import redis.asyncio as aioredis

from slurmproxy.errors import StateUnavailable
from slurmproxy.state.guard import BackendDown, Guard
from slurmproxy.state.keys import Namer
from slurmproxy.upstream.shield import CachedAnswer, Key, SharedResponse

if TYPE_CHECKING:
    from slurmproxy.observability.metrics import Metrics


def encode(response: SharedResponse, sent_at: float) -> bytes:
    meta = {
        "s": response.status_code,
        "h": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in response.headers],
        "t": sent_at,
    }
    return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + response.body


def decode(value: bytes, now: float) -> CachedAnswer | None:
    meta_line, sep, body = value.partition(b"\n")
    if not sep:
        return None
    try:
        meta = json.loads(meta_line)
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in meta["h"]]
        return CachedAnswer(int(meta["s"]), headers, body, max(0.0, now - float(meta["t"])))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class SharedResponseCache:
    """The shield's :class:`~slurmproxy.upstream.shield.SharedCache`, in Redis."""

    def __init__(
        self,
        client: aioredis.Redis,
        guard: Guard,
        namer: Namer,
        *,
        outage: Literal["local", "fail_closed"],
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._guard = guard
        self._namer = namer
        self._outage = outage
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic

    def _name(self, key: Key) -> str:
        account, method, path, query, headers = key
        return self._namer.name("shield", account, method, path, query, headers)

    async def get(self, key: Key) -> CachedAnswer | None:
        name = self._name(key)
        try:
            value = await self._guard.call("shield", lambda: self._client.get(name))
        except BackendDown as down:
            if self._outage == "fail_closed":
                raise StateUnavailable(
                    f"the shared response cache ({down.detail}); refused because state.shield_outage is fail_closed",
                    reason="shield_cache_unavailable",
                    headers={"Retry-After": str(max(1, math.ceil(self._guard.retry_seconds)))},
                ) from down
            if self._metrics is not None:
                self._metrics.state_fallback("shield")
            return None
        return decode(value, self._clock()) if isinstance(value, bytes) else None

    async def put(self, key: Key, response: SharedResponse, ttl: float) -> None:
        # fetched_at is on this worker's monotonic clock; the value carries wall-clock time for other replicas.
        sent_at = self._clock() - (self._monotonic() - response.fetched_at)
        value, name, millis = encode(response, sent_at), self._name(key), max(1, int(ttl * 1000))
        try:
            await self._guard.call("shield", lambda: self._client.set(name, value, px=millis))
        except BackendDown:
            return  # counted and logged by the guard; this worker's cache still holds the answer
