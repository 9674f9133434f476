"""The introspection budget: how many tokens not seen before may be sent to the provider's introspection.

An opaque token names no issuer and carries nothing to verify, so without a budget every junk token
would cost one introspection POST to the provider (301 junk tokens, 301 POSTs): anyone could get the
proxy throttled or banned by its provider. Tokens already cached (validated or refused) cost nothing;
for the others, :meth:`IntrospectionBudget.admit` gives a :class:`Ticket` or refuses:

* at most ``concurrency`` introspections at once (503 ``introspection_busy``);
* a token bucket per client address (429 ``introspection_rate_limited``: that client sends too many
  new tokens), and one for everyone (503 ``introspection_budget_exhausted``: the provider is shielded).

Refusals carry ``Retry-After`` and are never remembered for the token: once the budget allows, the
same token is introspected. Buckets of idle clients are dropped (bounded memory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from slurmproxy.errors import DependencyError, RateLimitedError

MAX_CLIENTS = 10_000
RETRY = {"Retry-After": "1"}


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float

    def refill(self, now: float, rate: float, burst: float) -> None:
        self.tokens = min(burst, self.tokens + (now - self.updated) * rate)
        self.updated = now


class Ticket:
    """One introspection in progress; :meth:`release` (idempotent) gives its place back."""

    __slots__ = ("_budget",)

    def __init__(self, budget: IntrospectionBudget) -> None:
        self._budget: IntrospectionBudget | None = budget

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget.in_flight -= 1


class IntrospectionBudget:
    def __init__(
        self,
        *,
        concurrency: int,
        per_second: float,
        burst: int,
        per_client_per_second: float,
        per_client_burst: int,
        clock: Callable[[], float],
        refused: Callable[[str], None] | None = None,
    ) -> None:
        self._concurrency = concurrency
        self._rate, self._burst = per_second, float(burst)
        self._client_rate, self._client_burst = per_client_per_second, float(per_client_burst)
        self._clock = clock
        self._refused = refused  # told the reason of every refusal (a metric)
        self._everyone = _Bucket(float(burst), clock())
        idle = max(self._client_burst / self._client_rate, 1.0)  # a full bucket again: nothing to remember
        self._clients: TTLCache[str, _Bucket] = TTLCache(MAX_CLIENTS, ttl=idle, timer=clock)
        self.in_flight = 0

    def _refuse(self, error: DependencyError | RateLimitedError) -> DependencyError | RateLimitedError:
        if self._refused is not None:
            self._refused(error.reason)
        return error

    def admit(self, client: str | None) -> Ticket:
        """A ticket for one introspection of a token not seen before, or the refusal (nothing spent)."""
        if self.in_flight >= self._concurrency:
            raise self._refuse(
                DependencyError(
                    "too many tokens are being checked with the identity provider at once; retry shortly",
                    reason="introspection_busy",
                    headers=RETRY,
                )
            )
        now = self._clock()
        key = client or "-"
        mine = self._clients.get(key)
        if mine is None:
            mine = _Bucket(self._client_burst, now)
        mine.refill(now, self._client_rate, self._client_burst)
        self._clients[key] = mine
        if mine.tokens < 1:
            raise self._refuse(
                RateLimitedError(
                    "too many new tokens from your address were sent to be checked with the identity provider; "
                    "reuse your token, or retry later",
                    reason="introspection_rate_limited",
                    headers=RETRY,
                )
            )
        self._everyone.refill(now, self._rate, self._burst)
        if self._everyone.tokens < 1:
            raise self._refuse(
                DependencyError(
                    "the proxy is checking as many new tokens with the identity provider as it may; retry shortly",
                    reason="introspection_budget_exhausted",
                    headers=RETRY,
                )
            )
        mine.tokens -= 1
        self._everyone.tokens -= 1
        self.in_flight += 1
        return Ticket(self)
