from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from slurmproxy.config.settings import ShieldSettings
from slurmproxy.errors import UpstreamError
from slurmproxy.upstream.exchange import UpstreamResponse
from slurmproxy.upstream.shield import Key, Shield, variant

pytestmark = pytest.mark.anyio
JOBS = "/slurm/v0.0.42/jobs"


def make_shield(*cache: tuple[str, float], clock: Clock | None = None, **settings: object) -> Shield:
    """A shield with these cache rules; sizes below the settings' minimums are taken as given (tests)."""
    rules = [{"path": path, "ttl_seconds": ttl} for path, ttl in cache]
    validated = ShieldSettings.model_validate({"cache": rules})
    if clock is None:
        return Shield(validated.model_copy(update=settings))
    return Shield(validated.model_copy(update=settings), clock=clock)


async def settle() -> None:
    """Let every task started so far run until it waits (event-loop turns, not time)."""
    for _ in range(20):
        await asyncio.sleep(0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Body:
    """A response body in two chunks, as a connection would deliver it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        half = len(self.data) // 2
        for chunk in (self.data[:half], self.data[half:]):
            if chunk:
                yield chunk

    async def aclose(self) -> None:
        self.closed = True


class Upstream:
    """Counts requests; each answer waits on ``gate`` so that requests overlap."""

    def __init__(self, status: int = 200, body: bytes = b'{"jobs":[]}') -> None:
        self.calls = 0
        self.status = status
        self.body = body
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def send(self) -> UpstreamResponse:
        self.calls += 1
        number = self.calls
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        body = self.body + str(number).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        return UpstreamResponse(self.status, headers, Body(body))


def key(user: str = "alice", path: str = JOBS, query: bytes = b"", headers: bytes = b"") -> Key:
    return (user, "GET", path, query, headers)


async def test_concurrent_identical_gets_share_one_upstream_request() -> None:
    shield, upstream = make_shield(), Upstream()
    tasks = [asyncio.create_task(shield.fetch(key(), upstream.send)) for _ in range(50)]
    await settle()
    upstream.gate.set()
    results = await asyncio.gather(*tasks)
    assert upstream.calls == 1
    assert {r.shared.body for r in results if r.shared} == {b'{"jobs":[]}1'}
    assert sorted(r.source for r in results).count("coalesced") == 49


async def test_never_shared_across_local_accounts_paths_or_queries() -> None:
    shield, upstream = make_shield(), Upstream()
    keys = [
        key("alice"),
        key("bob"),
        key("alice", "/slurm/v0.0.42/job/1"),
        key("alice", query=b"update_time=5"),
        key("alice", headers=b"accept:application/x-yaml"),
    ]
    tasks = [asyncio.create_task(shield.fetch(k, upstream.send)) for k in keys]
    await settle()
    upstream.gate.set()
    results = await asyncio.gather(*tasks)
    assert upstream.calls == 5
    assert len({r.shared.body for r in results if r.shared}) == 5


def test_the_key_holds_every_forwarded_header_but_the_invariant_ones() -> None:
    yaml = [(b"Accept", b"application/x-yaml"), (b"user-agent", b"tool/1"), (b"x-request-id", b"r1")]
    json_ = [(b"accept", b"application/json"), (b"User-Agent", b"tool/2"), (b"x-request-id", b"r2")]
    assert variant(yaml) == b"accept:application/x-yaml"
    assert variant(yaml) != variant(json_)
    assert variant([(b"user-agent", b"a")]) == variant([(b"user-agent", b"b")]) == b""
    assert variant([(b"cookie", b"x=1")]) != variant([(b"cookie", b"x=2")])  # unknown headers count


async def test_cache_serves_within_ttl_only() -> None:
    clock = Clock()
    shield, upstream = make_shield(("/slurm/{version}/jobs", 2.0), clock=clock), Upstream()
    upstream.gate.set()
    first = await shield.fetch(key(), upstream.send)
    clock.now += 1.5
    second = await shield.fetch(key(), upstream.send)
    assert second.source == "cache" and second.shared == first.shared and second.age == pytest.approx(1.5)
    other_user = await shield.fetch(key("bob"), upstream.send)
    assert other_user.source == "upstream"
    clock.now += 0.6
    third = await shield.fetch(key(), upstream.send)
    assert third.source == "upstream" and upstream.calls == 3


async def test_a_cached_answer_ages_from_when_it_was_asked_for() -> None:
    clock = Clock()
    shield, upstream = make_shield(("/slurm/{version}/jobs", 2.0), clock=clock), Upstream()
    first = asyncio.create_task(shield.fetch(key(), upstream.send))
    await settle()
    clock.now += 10  # slurmrestd takes 10 s to answer
    upstream.gate.set()
    await first
    again = await shield.fetch(key(), upstream.send)
    assert again.source == "upstream" and upstream.calls == 2  # 10 s old already: never served from the cache


async def test_uncached_paths_and_errors_are_not_kept() -> None:
    clock = Clock()
    shield = make_shield(("/slurm/{version}/jobs", 5.0), clock=clock)
    upstream = Upstream(status=500)
    upstream.gate.set()
    await shield.fetch(key(), upstream.send)
    await shield.fetch(key(), upstream.send)
    await shield.fetch(key(path="/slurm/v0.0.42/nodes"), upstream.send)
    await shield.fetch(key(path="/slurm/v0.0.42/nodes"), upstream.send)
    assert upstream.calls == 4


async def test_upstream_failure_reaches_every_waiter() -> None:
    shield, upstream = make_shield(), Upstream()
    upstream.fail = UpstreamError("down")
    tasks = [asyncio.create_task(shield.fetch(key(), upstream.send)) for _ in range(5)]
    await settle()
    upstream.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, UpstreamError) for r in results)
    assert upstream.calls == 1
    upstream.fail = None
    assert (await shield.fetch(key(), upstream.send)).source == "upstream"  # nothing stuck in flight


async def test_waiters_get_the_answer_when_the_first_request_is_cancelled() -> None:
    shield, upstream = make_shield(), Upstream()
    leader = asyncio.create_task(shield.fetch(key(), upstream.send))
    await settle()
    follower = asyncio.create_task(shield.fetch(key(), upstream.send))
    await settle()
    leader.cancel()
    upstream.gate.set()
    result = await follower
    assert result.source == "coalesced" and result.shared is not None
    assert upstream.calls == 1
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_too_large_answers_are_streamed_not_shared() -> None:
    shield, upstream = make_shield(max_body_bytes=4), Upstream()
    tasks = [asyncio.create_task(shield.fetch(key(), upstream.send)) for _ in range(3)]
    await settle()
    upstream.gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r.stream is not None and r.shared is None for r in results)
    assert upstream.calls == 3
    for r in results:
        assert r.stream is not None
        await r.stream.aclose()


def test_applies_only_to_get() -> None:
    assert make_shield().applies("GET", JOBS)
    assert not make_shield().applies("POST", JOBS)
    assert not make_shield(coalesce=False).applies("GET", JOBS)
    assert make_shield(("/slurm/{version}/jobs", 1), coalesce=False).applies("GET", JOBS)


class Unsized(Upstream):
    """Answers without Content-Length (chunked), in two chunks."""

    async def send(self) -> UpstreamResponse:
        response = await super().send()
        response.headers = [(k, v) for k, v in response.headers if k != b"content-length"]
        return response


async def test_unsized_answers_too_large_to_share_are_streamed_whole() -> None:
    shield, upstream = make_shield(max_body_bytes=4), Unsized(body=b"0123456789")
    tasks = [asyncio.create_task(shield.fetch(key(), upstream.send)) for _ in range(3)]
    await settle()
    upstream.gate.set()
    results = await asyncio.gather(*tasks)
    bodies = []
    for r in results:
        assert r.stream is not None and r.shared is None and r.source == "upstream"
        bodies.append(b"".join([c async for c in r.stream.chunks()]))
        await r.stream.aclose()
    assert sorted(bodies) == [b"01234567891", b"01234567892", b"01234567893"]  # nothing lost from the peek
    assert shield.budget.used == 0


async def test_unsized_answers_that_fit_are_shared() -> None:
    shield, upstream = make_shield(), Unsized()
    tasks = [asyncio.create_task(shield.fetch(key(), upstream.send)) for _ in range(3)]
    await settle()
    upstream.gate.set()
    results = await asyncio.gather(*tasks)
    assert upstream.calls == 1 and {r.shared.body for r in results if r.shared} == {b'{"jobs":[]}1'}


async def test_the_byte_budget_bounds_what_is_held_and_is_given_back() -> None:
    clock = Clock()
    body = b"x" * 1000
    shield = make_shield(("/slurm/{version}/jobs", 2.0), max_bytes=2500, clock=clock)
    upstream = Upstream(body=body)
    upstream.gate.set()
    held = [await shield.fetch(key(f"user{n}"), upstream.send) for n in range(3)]
    assert [r.shared is not None for r in held] == [True, True, False]  # the third would pass 2,500 bytes
    assert shield.budget.used == 2 * 1001
    assert held[2].stream is not None
    await held[2].stream.aclose()
    held.clear()
    assert shield.budget.used == 2 * 1001  # still cached
    clock.now += 3  # past the TTL: expired entries give their bytes back when room is needed
    again = await shield.fetch(key("user3"), upstream.send)
    assert again.shared is not None and shield.budget.used == 1001
    del again
    shield._cache.clear()
    await asyncio.sleep(0)  # the loop lets go of the finished fetch's future in its next turn
    assert shield.budget.used == 0


async def test_a_shared_body_is_counted_until_its_last_holder_lets_go() -> None:
    shield, upstream = make_shield(), Upstream(body=b"y" * 100)
    upstream.gate.set()
    result = await shield.fetch(key(), upstream.send)
    assert shield.budget.used == 101  # not cached, but still being sent
    del result
    await asyncio.sleep(0)  # the loop lets go of the finished fetch's future in its next turn
    assert shield.budget.used == 0
