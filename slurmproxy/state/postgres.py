"""The PostgreSQL connection pool (psycopg 3, psycopg-pool) and the tables the proxy keeps there.

The password comes from ``state.postgres.password_file``, TLS from ``sslmode`` and the certificate
files; every connection has a ``statement_timeout`` of the operation timeout, and an operation that
meets a connection a server restart broke is tried again on another one, so a restart does not
fail requests. The pool opens in the background: a proxy starts while PostgreSQL is down and
uses it once it answers.

The tables are created when first needed (``CREATE TABLE IF NOT EXISTS`` under an advisory lock, so
that replicas starting together do not race), and ``slurmproxy_schema`` records their version:

* ``slurmproxy_leases``: pool leases, the columns of the embedded SQLite file;
* ``slurmproxy_alise_last_known``: ALISE's last found answer per (service, hashed identity).

The role needs to create tables in its database the first time (or an administrator runs
``slurmproxy mapping leases migrate`` once, which creates them too).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from slurmproxy.config.settings import PostgresSettings, StateSettings
from slurmproxy.state.guard import Guard
from slurmproxy.state.secrets import read_password

if TYPE_CHECKING:
    from slurmproxy.observability.metrics import Metrics

logger = logging.getLogger("slurmproxy.state")
T = TypeVar("T")
SCHEMA_VERSION = 1
RECONNECT_SECONDS = 5.0
SCHEMA_LOCK = 0x534C5052  # pg_advisory_xact_lock key while creating the tables ("SLPR")
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS slurmproxy_schema (
        component text PRIMARY KEY,
        version integer NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS slurmproxy_leases (
        account text PRIMARY KEY,
        pool text NOT NULL,
        issuer text NOT NULL,
        subject text NOT NULL,
        leased_at double precision NOT NULL,
        last_used double precision NOT NULL,
        rule text,
        UNIQUE (pool, issuer, subject)
    )""",
    "CREATE INDEX IF NOT EXISTS slurmproxy_leases_recent ON slurmproxy_leases (pool, leased_at)",
    """CREATE TABLE IF NOT EXISTS slurmproxy_alise_last_known (
        service text NOT NULL,
        identity text NOT NULL,
        username text NOT NULL,
        seen_at double precision NOT NULL,
        PRIMARY KEY (service, identity)
    )""",
]
Connection = psycopg.AsyncConnection[Any]


def connection_kwargs(settings: PostgresSettings) -> dict[str, Any]:
    """libpq parameters besides the DSN: the password, TLS files, timeouts. Never logged."""
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "application_name": "slurmproxy",
        "connect_timeout": settings.connect_timeout_seconds,
        "options": f"-c statement_timeout={int(settings.timeout_seconds * 1000)}",
    }
    password = read_password(settings.password_file, "state.postgres.password_file")
    if password is not None:
        kwargs["password"] = password
    sslmode = settings.sslmode or ("verify-full" if settings.ca_file else None)
    if sslmode is not None:
        kwargs["sslmode"] = sslmode
    for name, path in (
        ("sslrootcert", settings.ca_file),
        ("sslcert", settings.cert_file),
        ("sslkey", settings.key_file),
    ):
        if path is not None:
            kwargs[name] = str(path)
    return kwargs


def classify(exc: BaseException) -> str | None:
    if isinstance(exc, PoolTimeout | psycopg.errors.QueryCanceled):
        return "timeout"
    if isinstance(exc, psycopg.OperationalError | OSError):
        return "unreachable"
    if isinstance(exc, psycopg.Error):
        return "error"
    return None


class Postgres:
    """One pool per worker, and the guard every operation goes through."""

    def __init__(self, settings: StateSettings, metrics: Metrics | None = None) -> None:
        assert settings.postgres is not None
        pg = settings.postgres
        self.settings = pg
        self.pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            pg.dsn,
            kwargs=connection_kwargs(pg),
            min_size=1,
            max_size=pg.pool_size,
            open=False,
            timeout=pg.timeout_seconds,
            name="slurmproxy-state",
            # A connection attempt that keeps failing gives up after this (psycopg-pool would otherwise back
            # off for minutes); the next request that needs a connection starts a fresh attempt at once.
            reconnect_timeout=RECONNECT_SECONDS,
        )
        self.guard = Guard(
            "PostgreSQL",
            timeout=pg.timeout_seconds,
            retry_seconds=settings.retry_seconds,
            classify=classify,
            metrics=metrics,
            probe=self._ping,
            detach=True,
        )
        self._schema_ready = False
        self._opened = False

    async def _ping(self) -> None:
        async with self.connection() as conn:
            await conn.execute("SELECT 1")

    async def open(self) -> None:
        if not self._opened:
            self._opened = True
            await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.guard.aclose()
        if self._opened:
            await self.pool.close(timeout=2.0)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        await self.open()
        async with self.pool.connection() as conn:
            if not self._schema_ready:
                await ensure_schema(conn)
                self._schema_ready = True
            yield conn

    async def run(self, use: str, operation: Callable[[Connection], Awaitable[T]]) -> T:
        """``operation(conn)`` on a pooled connection, bounded and guarded (BackendDown on failure)."""

        async def on_a_connection() -> T:
            # A connection a server restart broke fails at once, and the pool drops it when it comes back:
            # try the next one (a pooled connection is not checked before each use: that would cost every
            # operation a round trip). A server that is really gone fails on a new connection, in time.
            for _ in range(self.settings.pool_size):
                async with self.connection() as conn:
                    try:
                        return await operation(conn)
                    except psycopg.OperationalError:
                        if not conn.broken:
                            raise
                        logger.info("PostgreSQL: a pooled connection was broken (a restart?); trying another")
            async with self.connection() as conn:
                return await operation(conn)

        return await self.guard.call(use, on_a_connection)


async def ensure_schema(conn: Connection) -> None:
    """Create the tables if they are missing; refuse a database written by a newer version."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        for statement in SCHEMA:
            await conn.execute(statement)
        cursor = await conn.execute("SELECT version FROM slurmproxy_schema WHERE component = 'state'")
        row = await cursor.fetchone()
        if row is not None and row[0] > SCHEMA_VERSION:
            raise psycopg.errors.FeatureNotSupported(
                f"the database has slurmproxy schema {row[0]}; this version knows {SCHEMA_VERSION}"
            )
        if row is None:
            await conn.execute(
                "INSERT INTO slurmproxy_schema (component, version) VALUES ('state', %s)", (SCHEMA_VERSION,)
            )
