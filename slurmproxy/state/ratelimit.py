"""Rate limits for the whole deployment: the rules' token buckets in Redis, one atomic script per check.

The buckets are those of :func:`slurmproxy.policy.ratelimit.buckets_for` (a rule's identity bucket
and VO bucket), with the same arithmetic as the embedded limiter: continuous refill at ``rate``
tokens per second up to ``capacity``, one token per request from every bucket that applies or from
none. One Lua script does the whole check on the server, so it is atomic across every replica and
worker: it reads the buckets, refuses (charging nothing) if any is empty, else takes a token from
each. It reads the time from the Redis server (``TIME``), so the replicas' clocks do not matter.
A bucket is a hash ``{t: tokens, u: updated}`` that expires when it would be full again (an absent
bucket and a full one behave the same), so Redis holds only the buckets in use.

Refusals are the embedded limiter's (:func:`~slurmproxy.policy.ratelimit.refusal`): 429 with
``Retry-After`` in whole seconds until the emptiest bucket has a token. Keys are
``<prefix>rl:<HMAC of rule, limits, kind, issuer, subject or VO>``: no subject in clear.

When Redis fails (``state.rate_limit_outage``): ``fail_closed`` refuses requests under rate-limited
rules with 503 ``rate_limit_unavailable`` (``Retry-After``: ``state.retry_seconds``); ``local``
counts them in this worker's own buckets until Redis answers again. Rules without limits never
touch Redis. Not for Redis Cluster: a rule's two buckets may live in different slots.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import redis.asyncio as aioredis

from slurmproxy.core.principal import Principal
from slurmproxy.errors import StateUnavailable
from slurmproxy.policy.ratelimit import RateLimiter, buckets_for, refusal
from slurmproxy.policy.rules import Rule
from slurmproxy.state.guard import BackendDown, Guard
from slurmproxy.state.keys import Namer

if TYPE_CHECKING:
    from slurmproxy.observability.metrics import Metrics

# KEYS: the buckets. ARGV: capacity and rate (tokens per second) of each, in order.
# Returns {0, "0"} when a token was taken from every bucket, else {n, wait}: the emptiest bucket
# (1-based) and the seconds until it has a token; nothing is charged then.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
local worst, worst_wait = 0, 0
for i = 1, #KEYS do
  local cap, rate = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local stored = redis.call('HMGET', KEYS[i], 't', 'u')
  local tokens = cap
  if stored[1] then
    tokens = math.min(cap, tonumber(stored[1]) + math.max(0, now - tonumber(stored[2])) * rate)
  end
  levels[i] = tokens
  if tokens < 1 then
    local wait = (1 - tokens) / rate
    if wait > worst_wait then
      worst, worst_wait = i, wait
    end
  end
end
if worst > 0 then
  return {worst, string.format('%.6f', worst_wait)}
end
for i = 1, #KEYS do
  local cap, rate = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tokens = levels[i] - 1
  redis.call('HSET', KEYS[i], 't', string.format('%.17g', tokens), 'u', string.format('%.6f', now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((cap - tokens) / rate * 1000) + 1000)
end
return {0, '0'}
"""


class SharedRateLimits:
    """The shared :class:`~slurmproxy.policy.ratelimit.RateLimits`."""

    def __init__(
        self,
        client: aioredis.Redis,
        guard: Guard,
        namer: Namer,
        *,
        outage: Literal["fail_closed", "local"],
        metrics: Metrics | None = None,
    ) -> None:
        self._script = client.register_script(TAKE)
        self._guard = guard
        self._namer = namer
        self._outage = outage
        self._metrics = metrics
        self._local = RateLimiter()  # this worker's buckets, for `rate_limit_outage: local`

    async def take(self, rule: Rule, principal: Principal, entitlement: str | None) -> None:
        wanted = buckets_for(rule, principal, entitlement)
        if not wanted:
            return
        keys = [self._namer.name("rl", *w.key) for w in wanted]
        args = [value for w in wanted for value in (repr(w.spec.capacity), repr(w.spec.rate))]
        try:
            answer = await self._guard.call("rate_limit", lambda: self._script(keys=keys, args=args))
        except BackendDown as down:
            self._during_outage(rule, principal, entitlement, down)
            return
        worst, wait = int(answer[0]), float(answer[1])
        if worst:
            bucket = wanted[worst - 1]
            raise refusal(rule, bucket.what, bucket.spec, wait)

    def _during_outage(self, rule: Rule, principal: Principal, entitlement: str | None, down: BackendDown) -> None:
        if self._outage == "local":
            if self._metrics is not None:
                self._metrics.state_fallback("rate_limit")
            self._local.check(rule, principal, entitlement)
            return
        retry = max(1, math.ceil(self._guard.retry_seconds))
        raise StateUnavailable(
            f"the rate limits of rule {rule.id} cannot be checked: the shared rate-limit store ({down.detail}); "
            "refused because state.rate_limit_outage is fail_closed",
            reason="rate_limit_unavailable",
            headers={"Retry-After": str(retry)},
        )
