"""The shield's cache shared in Redis: one replica's answer serves the others, with the same keys and limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from devstack.redis_server import RedisServer
from slurmproxy.config.settings import ShieldSettings, StateSettings
from slurmproxy.errors import StateUnavailable
from slurmproxy.observability.metrics import Metrics
from slurmproxy.state.keys import Namer
from slurmproxy.state.redis_client import connect, redis_guard
from slurmproxy.state.shield import SharedResponseCache
from slurmproxy.upstream.shield import Shield
from tests.state.conftest import state_settings
from tests.upstream.test_shield import Upstream, key

pytestmark = [pytest.mark.integration, pytest.mark.anyio]
Replica = Callable[..., Shield]


@pytest.fixture
async def replica(clean_redis: RedisServer) -> AsyncIterator[Replica]:
    """Each call: one more worker's shield (its own memory, its own Redis connections), one shared tier."""
    opened: list[Any] = []

    def make(
        ttl: float = 5.0, state: StateSettings | None = None, metrics: Metrics | None = None, **shield: Any
    ) -> Shield:
        state = state or state_settings(clean_redis)
        assert state.redis is not None
        client = connect(state.redis)
        guard = redis_guard(state, client, metrics)
        opened.append((client, guard))
        cache = SharedResponseCache(
            client, guard, Namer(b"k" * 16, state.redis.key_prefix), outage=state.shield_outage, metrics=metrics
        )
        settings = ShieldSettings.model_validate({"cache": [{"path": "/slurm/{version}/jobs", "ttl_seconds": ttl}]})
        return Shield(settings.model_copy(update=shield), shared=cache)

    yield make
    for client, guard in opened:
        await guard.aclose()
        await client.aclose()


def answering(**kwargs: Any) -> Upstream:
    upstream = Upstream(**kwargs)
    upstream.gate.set()
    return upstream


async def test_one_replicas_answer_serves_the_others(replica: Replica) -> None:
    upstream = answering()
    first, second, third = replica(), replica(), replica()
    fetched = await first.fetch(key(), upstream.send)
    assert fetched.source == "upstream" and fetched.shared is not None
    for other in (second, third, first):
        served = await other.fetch(key(), upstream.send)
        assert served.source == "cache" and served.shared is not None
        assert (served.shared.status_code, served.shared.body) == (200, fetched.shared.body)
        assert served.shared.headers == fetched.shared.headers
        assert 0 <= served.age < 5
    assert upstream.calls == 1


async def test_never_across_local_accounts_paths_queries_or_headers(replica: Replica) -> None:
    upstream = answering()
    first, second = replica(), replica()
    await first.fetch(key(), upstream.send)
    for other in (key("bob"), key(query=b"update_time=1"), key(headers=b"accept:application/x-yaml")):
        assert (await second.fetch(other, upstream.send)).source == "upstream"
    assert upstream.calls == 4


async def test_redis_forgets_an_answer_when_its_ttl_is_over(replica: Replica) -> None:
    upstream = answering()
    first, second = replica(ttl=0.3), replica(ttl=0.3)
    await first.fetch(key(), upstream.send)
    await asyncio.sleep(0.5)  # longer than the TTL: Redis has expired it (PX)
    assert (await second.fetch(key(), upstream.send)).source == "upstream"
    assert upstream.calls == 2


async def test_only_what_the_shield_may_keep_goes_to_redis(replica: Replica, clean_redis: RedisServer) -> None:
    big = answering(body=b"x" * 2000)
    await replica(max_body_bytes=1024).fetch(key(), big.send)  # too large to share: streamed, never cached
    failed = answering(status=500)
    await replica().fetch(key("bob"), failed.send)  # only 200s are cached
    assert clean_redis.cli("--scan") == ""
    await replica().fetch(key("carol@example.org"), answering().send)
    (name,) = clean_redis.cli("--scan").split()
    assert name.startswith("slurmproxy:shield:") and "carol" not in name and "jobs" not in name


async def test_redis_down_local_forwards_and_uses_the_workers_cache(replica: Replica, clean_redis: RedisServer) -> None:
    metrics = Metrics()
    shield = replica(state=state_settings(clean_redis, retry_seconds=0.2), metrics=metrics)
    upstream = answering()
    clean_redis.stop()
    try:
        assert (await shield.fetch(key(), upstream.send)).source == "upstream"
        assert (await shield.fetch(key(), upstream.send)).source == "cache"  # this worker's own
    finally:
        clean_redis.start()
    assert 'slurmproxy_state_fallbacks_total{use="shield"} 1.0' in metrics.render().decode()


async def test_redis_down_fail_closed_is_503(replica: Replica, clean_redis: RedisServer) -> None:
    shield = replica(state=state_settings(clean_redis, shield_outage="fail_closed", retry_seconds=0.2))
    clean_redis.stop()
    try:
        with pytest.raises(StateUnavailable) as refused:
            await shield.fetch(key(), answering().send)
    finally:
        clean_redis.start()
    error = refused.value
    assert (error.status_code, error.reason) == (503, "shield_cache_unavailable")
    assert "state.shield_outage is fail_closed" in error.detail and error.headers == {"Retry-After": "1"}
