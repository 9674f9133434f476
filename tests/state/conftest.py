"""Real Redis and PostgreSQL for the shared-state tests (devstack: loopback, own data directories).

Nothing here skips: a server that cannot start raises, and the run fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from devstack.postgres import PostgresServer
from devstack.redis_server import RedisServer
from slurmproxy.config.settings import StateSettings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path_factory.mktemp("pg")) as server:
        yield server


def state_settings(
    redis_server: RedisServer | None = None,
    postgres: PostgresServer | None = None,
    *,
    redis: dict[str, Any] | None = None,
    pg: dict[str, Any] | None = None,
    **extra: Any,
) -> StateSettings:
    """``state:`` as an admin writes it: URLs without secrets, passwords in files."""
    data: dict[str, Any] = {"backend": "shared", **extra}
    data["redis"] = {
        "url": redis_server.url_without_password if redis_server else "redis://127.0.0.1:1/0",
        "password_file": str(redis_server.password_file) if redis_server else None,
        **(redis or {}),
    }
    if postgres is not None:
        data["postgres"] = {
            "dsn": postgres.dsn_without_password,
            "password_file": str(postgres.password_file),
            **(pg or {}),
        }
    return StateSettings.model_validate(data)


@pytest.fixture
def clean_postgres(postgres: PostgresServer) -> PostgresServer:
    """The server with the proxy's tables empty (or not there yet)."""
    if not postgres.running:
        postgres.start()
    with psycopg.connect(postgres.dsn, connect_timeout=10, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS slurmproxy_leases, slurmproxy_alise_last_known, slurmproxy_schema")
    return postgres


@pytest.fixture
def clean_redis(redis_server: RedisServer) -> RedisServer:
    if not redis_server.running:
        redis_server.start()
    redis_server.cli("FLUSHALL")
    return redis_server
