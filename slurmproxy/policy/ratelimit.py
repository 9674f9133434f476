"""Per-identity and per-VO request rate limits: token buckets configured per policy rule.

A rule's ``rate_limit`` names up to two buckets (``slurmproxy.policy.model.RateLimitSpec``):

* ``per_identity``: one bucket per (issuer, subject). Two people behind one shared service account
  are two identities, so they never share a limit; the same subject from two issuers is two people.
* ``per_vo``: one bucket per VO (namespace + group) of the entitlement that admitted the caller,
  shared by everyone the rule admits through that VO. A rule that admits by ``subjects`` alone has
  no VO, and only its identity bucket applies.

Buckets belong to the rule (and to its limits: changing a limit on policy reload starts fresh
buckets). A request takes one token from every bucket that applies, or from none: when any bucket
is empty the request is refused with 429 and ``Retry-After`` (whole seconds until that bucket has a
token again), and no other bucket is charged.

Memory is bounded: buckets live in a ``cachetools.TLRUCache`` of at most ``max_keys`` entries. A
bucket expires when it would be full again (an absent bucket and a full one behave the same), and
the least recently used bucket is dropped when the cache is full.

With the embedded backend (``state.backend: embedded``) limits are per worker process: with
``server.workers: N`` a caller may get up to N times a rule's rate. The shared backend
(``slurmproxy.state``) keeps the same buckets in Redis, for the whole deployment; both implement
:class:`RateLimits` and name their buckets with :func:`buckets_for` and refuse with :func:`refusal`,
so the two behave alike. Refusals are counted in the request metrics, by their reason ``rate_limited``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

from cachetools import TLRUCache

from slurmproxy.core.entitlements import parse
from slurmproxy.core.principal import Principal
from slurmproxy.errors import RateLimitedError
from slurmproxy.policy.model import BucketSpec, RateLimitSpec
from slurmproxy.policy.rules import Rule

DEFAULT_MAX_KEYS = 100_000


@dataclass
class Bucket:
    """Tokens available now (``tokens`` as of ``updated``), refilled continuously up to capacity."""

    spec: BucketSpec
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.spec.capacity, self.tokens + elapsed * self.spec.rate)
        self.updated = now

    def wait(self) -> float:
        """Seconds until a token is available (0 when one is)."""
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.spec.rate

    def full_at(self) -> float:
        return self.updated + (self.spec.capacity - self.tokens) / self.spec.rate


def _expiry(key: Hashable, bucket: Bucket, now: float) -> float:
    return max(bucket.full_at(), now)


def describe(limits: RateLimitSpec) -> str:
    """For admins: ``per identity 10 per 1 s (burst 20); per VO 600 per 60 s (burst 600)``."""
    parts = []
    for what, spec in (("per identity", limits.per_identity), ("per VO", limits.per_vo)):
        if spec is not None:
            parts.append(f"{what} {spec.requests:g} per {spec.period_seconds:g} s (burst {spec.capacity:g})")
    return "; ".join(parts)


def vo_of(entitlement: str | None) -> str | None:
    """The VO of an entitlement (namespace + group, without subgroups, role or authority)."""
    parsed = parse(entitlement) if entitlement else None
    return f"{parsed.namespace}:group:{parsed.group}" if parsed is not None else None


@dataclass(frozen=True, slots=True)
class Wanted:
    """One bucket a request takes a token from: what it is for (``identity``, ``VO …``), its key parts and spec."""

    what: str
    key: tuple[str, ...]
    spec: BucketSpec


def buckets_for(rule: Rule, principal: Principal, entitlement: str | None) -> list[Wanted]:
    """The buckets of ``rule`` that apply to this caller: its identity's, and its VO's when admitted through one."""
    limits = rule.rate_limit
    if limits is None:
        return []
    wanted: list[Wanted] = []
    if limits.per_identity is not None:
        key = (rule.id, limits.per_identity.model_dump_json(), "identity", principal.issuer, principal.subject)
        wanted.append(Wanted("identity", key, limits.per_identity))
    vo = vo_of(entitlement)
    if limits.per_vo is not None and vo is not None:
        wanted.append(Wanted(f"VO {vo}", (rule.id, limits.per_vo.model_dump_json(), "vo", vo), limits.per_vo))
    return wanted


def refusal(rule: Rule, what: str, spec: BucketSpec, wait: float) -> RateLimitedError:
    """The 429 for the emptiest bucket: ``Retry-After`` is the whole seconds until it has a token again."""
    retry = max(1, math.ceil(wait))
    return RateLimitedError(
        f"rate limit of rule {rule.id} reached for this {what}: {spec.requests:g} requests per "
        f"{spec.period_seconds:g} s (burst {spec.capacity:g}); retry in {retry} s",
        headers={"Retry-After": str(retry)},
    )


class RateLimits(Protocol):
    """What the policy stage needs of a rate limiter: take a token from every bucket that applies, or raise."""

    async def take(self, rule: Rule, principal: Principal, entitlement: str | None) -> None: ...


class RateLimiter:
    """The embedded rate limiter: buckets in this process. Not thread-safe (one event loop)."""

    def __init__(self, *, max_keys: int = DEFAULT_MAX_KEYS, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: TLRUCache[Hashable, Bucket] = TLRUCache(maxsize=max_keys, ttu=_expiry, timer=clock)

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, key: Hashable, spec: BucketSpec, now: float) -> Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            return Bucket(spec, spec.capacity, now)
        bucket.refill(now)
        return bucket

    async def take(self, rule: Rule, principal: Principal, entitlement: str | None) -> None:
        self.check(rule, principal, entitlement)

    def check(self, rule: Rule, principal: Principal, entitlement: str | None) -> None:
        """Take a token for this request from each of the rule's buckets, or raise RateLimitedError."""
        wanted = buckets_for(rule, principal, entitlement)
        if not wanted:
            return
        now = self._clock()
        buckets = [(w.what, w.key, self._bucket(w.key, w.spec, now)) for w in wanted]
        empty = [(what, bucket) for what, _, bucket in buckets if bucket.wait() > 0]
        if empty:
            what, bucket = max(empty, key=lambda item: item[1].wait())
            raise refusal(rule, what, bucket.spec, bucket.wait())
        for _, key, bucket in buckets:
            bucket.tokens -= 1.0
            self._buckets[key] = bucket  # re-inserted: its expiry moves with its level
