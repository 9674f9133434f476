"""ALISE's last-known answers shared in PostgreSQL: ``outage: last_known`` answers alike on every replica."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pytest_httpx import HTTPXMock

from devstack.postgres import PostgresServer
from slurmproxy.errors import DependencyError
from slurmproxy.identity.alise import AliseClient
from slurmproxy.state.keys import Namer
from slurmproxy.state.lastknown import SharedLastKnown
from slurmproxy.state.postgres import Postgres
from tests.identity.test_alise import ISS, SUB, Clock, sample, settings, url
from tests.state.conftest import state_settings

pytestmark = [pytest.mark.integration, pytest.mark.anyio]
Replica = Callable[[], AliseClient]


@pytest.fixture
async def replica(tmp_path: Path, clean_postgres: PostgresServer) -> AsyncIterator[Replica]:
    """Each call: one more replica's ALISE client, with its own connections to the one database."""
    clock, opened = Clock(), []

    def make() -> AliseClient:
        db = Postgres(state_settings(postgres=clean_postgres, retry_seconds=0.2))
        alise_settings = settings(tmp_path, cache_seconds=10, outage="last_known", last_known_max_age_seconds=100)
        store = SharedLastKnown(db, Namer(b"k" * 16), {"egi": 100.0}, clock=clock)
        client = AliseClient.create("egi", alise_settings, clock=clock, last_known=store)
        opened.append((client, db))
        return client

    make.clock = clock  # type: ignore[attr-defined]
    yield make
    for client, db in opened:
        await client.aclose()
        await db.close()


def alise_answers_once_then_fails(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=url(), json=sample("mapping_response.constructed"))
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=url(), is_reusable=True)


async def test_a_replica_that_never_asked_serves_the_answer_another_got_with_its_age(
    replica: Replica, httpx_mock: HTTPXMock, clean_postgres: PostgresServer
) -> None:
    alise_answers_once_then_fails(httpx_mock)
    clock: Clock = replica.clock  # type: ignore[attr-defined]
    first, second = replica(), replica()
    assert (await first.lookup(ISS, SUB)).via == "alise"
    clock.now += 42
    stale = await second.lookup(ISS, SUB)
    assert (stale.username, stale.via, stale.age_seconds) == ("jdoe42", "last_known", 42.0)
    clock.now += 59  # 101 s: older than last_known_max_age_seconds
    with pytest.raises(DependencyError):
        await second.lookup(ISS, SUB)
    with psycopg.connect(clean_postgres.dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT service, identity, username FROM slurmproxy_alise_last_known").fetchall()
    assert [(service, username) for service, _, username in rows] == [("egi", "jdoe42")]
    assert SUB not in rows[0][1] and len(rows[0][1]) == 64  # a keyed hash, never the subject


async def test_postgres_down_too_serves_what_this_replica_saw(
    replica: Replica, httpx_mock: HTTPXMock, clean_postgres: PostgresServer
) -> None:
    alise_answers_once_then_fails(httpx_mock)
    clock: Clock = replica.clock  # type: ignore[attr-defined]
    first, second = replica(), replica()
    await first.lookup(ISS, SUB)
    clock.now += 11  # past cache_seconds: ALISE is asked again, and fails
    clean_postgres.stop()
    try:
        stale = await first.lookup(ISS, SUB)
        assert (stale.via, stale.age_seconds) == ("last_known", 11.0)
        with pytest.raises(DependencyError) as refused:
            await second.lookup(ISS, SUB)
    finally:
        clean_postgres.start()
    assert refused.value.status_code == 503


async def test_fail_closed_services_write_nothing(
    tmp_path: Path, httpx_mock: HTTPXMock, clean_postgres: PostgresServer
) -> None:
    httpx_mock.add_response(url=url(), json=sample("mapping_response.constructed"))
    db = Postgres(state_settings(postgres=clean_postgres))
    writes: list[Any] = []

    class Recording(SharedLastKnown):
        async def remember(self, *args: Any) -> None:
            writes.append(args)

    client = AliseClient.create(
        "egi", settings(tmp_path), clock=Clock(), last_known=Recording(db, Namer(b"k" * 16), {"egi": 100.0})
    )
    try:
        await client.lookup(ISS, SUB)
    finally:
        await client.aclose()
        await db.close()
    assert writes == []
