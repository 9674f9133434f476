"""Issue 15, item 4: request bodies cannot hold slurmrestd's connections.

Bodies are refused where slurmrestd takes none, read whole (bounded, under the body deadline) before an
upstream connection is taken, and one identity may hold only so many upstream connections at once.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.asgi import app_session
from tests.fakeupstream import ThreadedFakeSlurmrestd as Upstream
from tests.helpers import UPSTREAM, Signer, basic_policy, make_settings

pytestmark = pytest.mark.anyio
JOBS = "/slurm/v0.0.40/jobs"
NODE = "/slurm/v0.0.40/node/n1"


async def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait for something the proxy does concurrently; the deadline only bounds a hang."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.01)


def writers_policy() -> dict[str, Any]:
    return basic_policy(
        allow=[
            "read-only",
            {"methods": ["POST"], "path": "/slurm/{version}/node/{name}"},
            {"methods": ["DELETE"], "path": "/slurm/{version}/jobs"},
        ]
    )


def auth(signer: Signer, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {signer.token(**claims)}"}


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS", "HEAD"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_where_slurmrestd_takes_none_is_refused(
    tmp_path: Path, signer: Signer, upstream: Upstream, method: str, framing: str
) -> None:
    path = "/slurm/v0.0.40/job/7" if method == "DELETE" else JOBS
    content: Any = b"slow body" if framing == "content-length" else chunks(b"slow", b" body")
    async with app_session(make_settings(tmp_path, writers_policy())) as (client, _):
        response = await client.request(method, path, content=content, headers=auth(signer))
    assert response.status_code == 400
    if method != "HEAD":
        assert response.json()["slurmproxy"]["reason"] == "body_not_allowed"
    assert upstream.get_requests() == []


async def test_an_empty_body_on_a_get_and_a_body_on_bulk_delete_pass(
    tmp_path: Path, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{JOBS}", json={"jobs": []})
    upstream.add_response(url=f"{UPSTREAM}{JOBS}", method="DELETE", json={"status": []})
    kill = json.dumps({"signal": "SIGTERM", "job_name": "x"}).encode()
    async with app_session(make_settings(tmp_path, writers_policy())) as (client, _):
        empty = await client.get(JOBS, headers={**auth(signer), "Content-Length": "0"})
        bulk = await client.request("DELETE", JOBS, content=kill, headers=auth(signer))
    assert (empty.status_code, bulk.status_code) == (200, 200)
    assert [r.content for r in upstream.get_requests()] == [b"", kill]


async def test_a_slow_body_is_read_whole_before_an_upstream_connection_is_taken(
    tmp_path: Path, signer: Signer, upstream: Upstream
) -> None:
    """A client trickling a body holds its own request, never one of slurmrestd's connections."""
    upstream.add_response(url=f"{UPSTREAM}{NODE}", method="POST", json={"errors": []})
    seen_during_body: list[int] = []
    async with app_session(make_settings(tmp_path, writers_policy())) as (client, state):
        pool = state["runtime"].upstream.pool

        async def trickle() -> AsyncIterator[bytes]:
            yield b'{"state": '
            # The proxy asks for the next part only after it read the first.
            seen_during_body.append(pool.connections_in_use)
            yield b'"DRAIN"}'

        # With its length announced, as the trickling clients of the review sent it (chunked bodies were
        # always read whole).
        response = await client.post(NODE, content=trickle(), headers={**auth(signer), "Content-Length": "18"})
    assert response.status_code == 200
    assert seen_during_body == [0]
    (sent,) = upstream.get_requests()
    assert sent.content == b'{"state": "DRAIN"}' and sent.headers["content-length"] == "18"


async def test_one_identity_holds_at_most_its_share_of_upstream_connections(
    tmp_path: Path, signer: Signer, upstream: Upstream
) -> None:
    release = threading.Event()
    upstream.add_response(url=f"{UPSTREAM}{JOBS}", json={"jobs": []}, hold=release, is_reusable=True)
    settings = make_settings(tmp_path, upstream={"max_connections_per_identity": 2})
    try:
        async with app_session(settings) as (client, state):
            pool = state["runtime"].upstream.pool
            alice = auth(signer)
            held = [asyncio.create_task(client.get(JOBS, headers=alice, params={"n": str(n)})) for n in range(2)]
            await until(lambda: len(upstream.get_requests()) == 2, "alice's two requests reach slurmrestd")
            third = await client.get(JOBS, headers=alice, params={"n": "3"})
            assert third.status_code == 429
            assert third.json()["slurmproxy"]["reason"] == "too_many_concurrent_requests"
            assert third.headers["retry-after"] == "1"
            bob = asyncio.create_task(client.get(JOBS, headers=auth(signer, sub="bob@example.org")))
            await until(lambda: len(upstream.get_requests()) == 3, "bob's request reaches slurmrestd")
            release.set()
            assert [r.status_code for r in await asyncio.gather(*held, bob)] == [200, 200, 200]
            assert pool.connections_in_use == 0
            again = await client.get(JOBS, headers=alice, params={"n": "4"})
            assert again.status_code == 200
    finally:
        release.set()
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    (refused,) = [r for r in records if r["status"] == 429]
    assert refused["decision"] == "deny" and refused["local_user"] == "alice"
