"""Rate limits in Redis: the embedded limiter's semantics for the whole deployment, and Redis failing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from devstack.redis_server import RedisServer
from slurmproxy.config.settings import StateSettings
from slurmproxy.errors import ProxyError, RateLimitedError, StateUnavailable
from slurmproxy.observability.metrics import Metrics
from slurmproxy.policy.ratelimit import RateLimiter
from slurmproxy.policy.rules import Rule
from slurmproxy.state.keys import Namer
from slurmproxy.state.ratelimit import SharedRateLimits
from slurmproxy.state.redis_client import connect, redis_guard
from tests.helpers import OTHER_ISSUER, VO_MEMBER
from tests.policy.test_ratelimit import ROLE_MEMBER, SUBGROUP_ADMIN, Clock, principal, rule
from tests.state.conftest import state_settings

pytestmark = [pytest.mark.integration, pytest.mark.anyio]
HOUR = 3600
Limiter = Callable[..., SharedRateLimits]


@pytest.fixture
async def limiter(clean_redis: RedisServer) -> AsyncIterator[Limiter]:
    """Replicas: each call is one more process's limiter, with its own connections."""
    opened: list[Any] = []

    def make(settings: StateSettings | None = None, metrics: Metrics | None = None) -> SharedRateLimits:
        settings = settings or state_settings(clean_redis)
        assert settings.redis is not None
        client = connect(settings.redis)
        guard = redis_guard(settings, client, metrics)
        opened.append((client, guard))
        namer = Namer(b"test key of sixteen bytes", settings.redis.key_prefix)
        return SharedRateLimits(client, guard, namer, outage=settings.rate_limit_outage, metrics=metrics)

    yield make
    for client, guard in opened:
        await guard.aclose()
        await client.aclose()


async def allowed(limits: SharedRateLimits, r: Rule, who: Any, ent: str | None = VO_MEMBER, n: int = 1) -> int:
    ok = 0
    for _ in range(n):
        try:
            await limits.take(r, who, ent)
            ok += 1
        except RateLimitedError:
            pass
    return ok


async def test_burst_then_429_with_the_embedded_limiters_retry_after_and_message(limiter: Limiter) -> None:
    r = rule(per_identity={"requests": 1, "period_seconds": 10, "burst": 3})
    shared, embedded = limiter(), RateLimiter(clock=Clock())
    assert await allowed(shared, r, principal(), n=3) == 3
    for _ in range(3):
        embedded.check(r, principal(), VO_MEMBER)
    with pytest.raises(RateLimitedError) as in_redis:
        await shared.take(r, principal(), VO_MEMBER)
    with pytest.raises(RateLimitedError) as in_process:
        embedded.check(r, principal(), VO_MEMBER)
    assert in_redis.value.status_code == 429 and in_redis.value.reason == "rate_limited"
    assert in_redis.value.headers == in_process.value.headers == {"Retry-After": "10"}
    assert in_redis.value.detail == in_process.value.detail


async def test_tokens_come_back_at_the_configured_rate(limiter: Limiter) -> None:
    shared = limiter()
    r = rule(per_identity={"requests": 5, "period_seconds": 1})
    assert await allowed(shared, r, principal(), n=10) == 5
    await asyncio.sleep(0.25)  # at least one token back (5 per second); more time only adds tokens
    assert 1 <= await allowed(shared, r, principal(), n=10) <= 5


async def test_identities_vos_and_refusals_behave_as_embedded(limiter: Limiter) -> None:
    shared = limiter()
    per_identity = rule(per_identity={"requests": 1, "period_seconds": 60})
    assert await allowed(shared, per_identity, principal("alice"), n=3) == 1
    assert await allowed(shared, per_identity, principal("alice", OTHER_ISSUER), n=3) == 1  # another person
    per_vo = rule("vo", per_vo={"requests": 2, "period_seconds": 60})
    assert await allowed(shared, per_vo, principal("alice"), ROLE_MEMBER) == 1
    assert await allowed(shared, per_vo, principal("bob"), SUBGROUP_ADMIN, n=3) == 1  # one VO, whatever the role
    with pytest.raises(RateLimitedError, match="for this VO urn:mace:egi.eu:group:vo.example.org"):
        await shared.take(per_vo, principal("carol"), ROLE_MEMBER)
    both = rule(
        "both", per_identity={"requests": 5, "period_seconds": 60}, per_vo={"requests": 1, "period_seconds": 60}
    )
    assert await allowed(shared, both, principal("alice"), n=4) == 1  # the VO is empty: alice is not charged
    alone = rule("both", per_identity={"requests": 5, "period_seconds": 60})
    assert await allowed(shared, alone, principal("alice"), n=10) == 4
    assert await allowed(shared, rule("none"), principal(), n=50) == 50  # no limits: Redis is not asked


async def test_the_limit_holds_across_replicas_racing(limiter: Limiter) -> None:
    replicas = [limiter() for _ in range(4)]
    r = rule(per_identity={"requests": 20, "period_seconds": HOUR})
    outcomes = await asyncio.gather(
        *(replicas[n % 4].take(r, principal(), None) for n in range(200)), return_exceptions=True
    )
    assert sum(o is None for o in outcomes) == 20
    assert all(o is None or isinstance(o, RateLimitedError) for o in outcomes)


async def test_keys_hold_no_subject_issuer_or_vo(limiter: Limiter, clean_redis: RedisServer) -> None:
    shared = limiter()
    r = rule(per_identity={"requests": 5, "period_seconds": 60}, per_vo={"requests": 5, "period_seconds": 60})
    await shared.take(r, principal("alice@example.org"), VO_MEMBER)
    keys = clean_redis.cli("--scan").split()
    assert len(keys) == 2 and all(k.startswith("slurmproxy:rl:") for k in keys)
    dump = " ".join(keys + [clean_redis.cli("HGETALL", k) for k in keys])
    for secret in ("alice", "example.org", "vo.example.org", "idp"):
        assert secret not in dump


async def test_redis_down_fail_closed_is_503_bounded_then_recovers(limiter: Limiter, clean_redis: RedisServer) -> None:
    metrics = Metrics()
    timeout = 0.5
    shared = limiter(state_settings(clean_redis, redis={"timeout_seconds": timeout}, retry_seconds=0.2), metrics)
    r = rule(per_identity={"requests": 100, "period_seconds": 60})
    await shared.take(r, principal(), None)
    for fault, repair in ((clean_redis.pause, clean_redis.resume), (clean_redis.stop, clean_redis.start)):
        fault()
        try:
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(StateUnavailable) as refused:
                    await shared.take(r, principal(), None)
                assert time.monotonic() - started < timeout + 0.5
                error = refused.value
                assert (error.status_code, error.reason, error.headers) == (
                    503,
                    "rate_limit_unavailable",
                    {"Retry-After": "1"},
                )
                assert "rule r cannot be checked" in error.detail and "fail_closed" in error.detail
            await shared.take(rule("unlimited"), principal(), None)  # rules without limits never need Redis
        finally:
            repair()
        await eventually(lambda: shared.take(r, principal(), None))
    text = metrics.render().decode()
    assert 'slurmproxy_state_errors_total{backend="Redis",kind="timeout",use="rate_limit"}' in text
    assert 'kind="down",use="rate_limit"' in text


async def test_redis_down_local_keeps_limiting_in_the_worker(limiter: Limiter, clean_redis: RedisServer) -> None:
    metrics = Metrics()
    settings = state_settings(clean_redis, rate_limit_outage="local", retry_seconds=0.2)
    shared = limiter(settings, metrics)
    r = rule(per_identity={"requests": 2, "period_seconds": HOUR})
    clean_redis.stop()
    try:
        assert await allowed(shared, r, principal(), n=5) == 2
    finally:
        clean_redis.start()
    assert 'slurmproxy_state_fallbacks_total{use="rate_limit"} 5.0' in metrics.render().decode()
    await eventually(
        lambda: shared.take(rule("other", per_identity={"requests": 1, "period_seconds": 60}), principal(), None)
    )


async def test_buckets_survive_a_redis_restart(limiter: Limiter, clean_redis: RedisServer) -> None:
    shared = limiter()
    r = rule(per_identity={"requests": 2, "period_seconds": HOUR})
    assert await allowed(shared, r, principal(), n=2) == 2
    clean_redis.restart()  # AOF: every answered write is on disk; the script cache is not
    await expect_refusal(shared, r)  # at once: a stale connection is replaced, the script loaded again


async def test_tls_and_a_password_file(tmp_path: Path) -> None:
    with RedisServer(tmp_path, tls=True) as server:
        assert server.ca_cert is not None
        settings = state_settings(server, redis={"ca_file": str(server.ca_cert)})
        assert settings.redis is not None and settings.redis.url.startswith("rediss://")
        client = connect(settings.redis)
        try:
            assert await client.ping()
        finally:
            await client.aclose()
        untrusted = connect(state_settings(server).redis)  # type: ignore[arg-type]
        try:
            with pytest.raises(Exception, match="certificate verify failed"):
                await untrusted.ping()
        finally:
            await untrusted.aclose()


async def expect_refusal(shared: SharedRateLimits, r: Rule) -> None:
    with pytest.raises(RateLimitedError):
        await shared.take(r, principal(), None)


async def eventually(attempt: Callable[[], Any], within: float = 30.0) -> None:
    """Retry ``attempt`` until it passes: recovery after a fault takes a probe interval or so, never a restart."""
    deadline = time.monotonic() + within
    while True:
        try:
            await attempt()
            return
        except (ProxyError, AssertionError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    with RedisServer(tmp_path, tls_client_auth=True) as server:
        assert server.ca_cert is not None and server.client_cert is not None
        pair = server.client_cert
        tls = {"ca_file": str(server.ca_cert), "cert_file": str(pair.cert), "key_file": str(pair.key)}
        client = connect(state_settings(server, redis=tls).redis)  # type: ignore[arg-type]
        try:
            assert await client.ping()
        finally:
            await client.aclose()
        without = connect(state_settings(server, redis={"ca_file": str(server.ca_cert)}).redis)  # type: ignore[arg-type]
        try:
            with pytest.raises(Exception, match="CERTIFICATE_REQUIRED|certificate required|Connection"):
                await without.ping()
        finally:
            await without.aclose()
