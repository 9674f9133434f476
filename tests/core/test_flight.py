from __future__ import annotations

import asyncio

import pytest

from slurmproxy.core.flight import SingleFlightCache
from slurmproxy.errors import AuthenticationError, DependencyError

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Counter:
    """A stand-in for a provider call: counts calls, answers when released."""

    def __init__(self, clock: Clock, *, ttl: float = 60.0, error: Exception | None = None) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.clock, self.ttl, self.error = clock, ttl, error

    async def __call__(self) -> tuple[str, float]:
        self.calls += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return f"value-{self.calls}", self.clock() + self.ttl


async def test_concurrent_misses_share_one_computation() -> None:
    clock = Clock()
    cache: SingleFlightCache[str, str] = SingleFlightCache(10, failure_seconds=5, clock=clock)
    work = Counter(clock)
    waiters = [asyncio.create_task(cache.compute("k", work)) for _ in range(200)]
    await asyncio.sleep(0)
    assert cache.in_flight == 1
    work.release.set()
    assert await asyncio.gather(*waiters) == ["value-1"] * 200
    assert work.calls == 1
    assert cache.get("k") == "value-1" and cache.in_flight == 0


async def test_value_expires_at_the_time_the_computation_gave() -> None:
    clock = Clock()
    cache: SingleFlightCache[str, str] = SingleFlightCache(10, failure_seconds=5, clock=clock)
    work = Counter(clock, ttl=30)
    work.release.set()
    await cache.compute("k", work)
    clock.now += 29.9
    assert cache.get("k") == "value-1"
    clock.now += 0.1
    assert cache.get("k") is None


async def test_already_expired_value_is_returned_but_not_kept() -> None:
    clock = Clock()
    cache: SingleFlightCache[str, str] = SingleFlightCache(10, failure_seconds=5, clock=clock)
    work = Counter(clock, ttl=-1)
    work.release.set()
    assert await cache.compute("k", work) == "value-1"
    assert cache.get("k") is None and len(cache) == 0


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(AuthenticationError("revoked", reason="token_inactive"), id="refusal"),
        pytest.param(DependencyError("down", reason="provider_unreachable"), id="provider-failure"),
    ],
)
async def test_failures_are_cached_briefly(error: Exception) -> None:
    clock = Clock()
    cache: SingleFlightCache[str, str] = SingleFlightCache(10, failure_seconds=5, clock=clock)
    work = Counter(clock, error=error)
    work.release.set()
    with pytest.raises(type(error)):
        await cache.compute("k", work)
    with pytest.raises(type(error)) as cached:
        cache.get("k")
    assert cached.value is not error and getattr(cached.value, "reason", None) == getattr(error, "reason", None)
    clock.now += 5
    assert cache.get("k") is None
    work.error = None
    assert await cache.compute("k", work) == "value-2"


async def test_every_waiter_gets_its_own_exception_instance() -> None:
    clock = Clock()
    cache: SingleFlightCache[str, str] = SingleFlightCache(10, failure_seconds=5, clock=clock)
    work = Counter(clock, error=DependencyError("down", reason="provider_timeout"))
    waiters = [asyncio.create_task(cache.compute("k", work)) for _ in range(3)]
    await asyncio.sleep(0)
    work.release.set()
    errors = await asyncio.gather(*waiters, return_exceptions=True)
    assert len({id(e) for e in errors}) == 3
    assert all(isinstance(e, DependencyError) and e.reason == "provider_timeout" for e in errors)


async def test_unexpected_exceptions_are_not_cached() -> None:
    clock = Clock()
    cache: SingleFlightCache[str, str] = SingleFlightCache(10, failure_seconds=5, clock=clock)
    work = Counter(clock, error=RuntimeError("bug"))
    work.release.set()
    with pytest.raises(RuntimeError):
        await cache.compute("k", work)
    assert cache.get("k") is None


async def test_failures_never_evict_values() -> None:
    clock = Clock()
    cache: SingleFlightCache[str, str] = SingleFlightCache(2, failure_seconds=5, clock=clock)
    good = Counter(clock)
    good.release.set()
    await cache.compute("good", good)
    bad = Counter(clock, error=AuthenticationError("bad", reason="bad_signature"))
    bad.release.set()
    for n in range(50):
        with pytest.raises(AuthenticationError):
            await cache.compute(f"bad-{n}", bad)
    assert cache.get("good") == "value-1"


async def test_size_is_bounded() -> None:
    clock = Clock()
    cache: SingleFlightCache[str, str] = SingleFlightCache(100, failure_seconds=5, clock=clock)
    work = Counter(clock)
    work.release.set()
    for n in range(1000):
        await cache.compute(f"k{n}", work)
    assert len(cache) == 100


async def test_a_waiter_that_goes_away_does_not_cancel_the_others() -> None:
    clock = Clock()
    cache: SingleFlightCache[str, str] = SingleFlightCache(10, failure_seconds=5, clock=clock)
    work = Counter(clock)
    first = asyncio.create_task(cache.compute("k", work))
    second = asyncio.create_task(cache.compute("k", work))
    await asyncio.sleep(0)
    first.cancel()
    work.release.set()
    assert await second == "value-1"
    assert first.cancelled()


async def test_aclose_cancels_computations_in_flight() -> None:
    clock = Clock()
    cache: SingleFlightCache[str, str] = SingleFlightCache(10, failure_seconds=5, clock=clock)
    waiter = asyncio.create_task(cache.compute("k", Counter(clock)))
    await asyncio.sleep(0)
    await cache.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert cache.in_flight == 0
