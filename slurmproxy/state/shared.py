"""The shared implementations and their clients (redis-py, psycopg), imported only with
``state.backend: shared`` (see :mod:`slurmproxy.state`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from slurmproxy.config.settings import Settings
from slurmproxy.identity.backends import pool_accounts, pool_limits
from slurmproxy.state.api import SharedState
from slurmproxy.state.guard import BackendDown, Guard
from slurmproxy.state.keys import Namer
from slurmproxy.state.lastknown import SharedLastKnown
from slurmproxy.state.leases import SharedLeases
from slurmproxy.state.postgres import Postgres, connection_kwargs
from slurmproxy.state.ratelimit import SharedRateLimits
from slurmproxy.state.redis_client import connect, redis_guard
from slurmproxy.state.secrets import read_hash_key, read_password
from slurmproxy.state.shield import SharedResponseCache

if TYPE_CHECKING:
    from slurmproxy.observability.metrics import Metrics

logger = logging.getLogger("slurmproxy.state")


def check_shared_config(settings: Settings) -> None:
    """What start-up would trip over: unreadable password or key files (ConfigError naming the setting)."""
    state = settings.state
    if state.backend != "shared":
        return
    read_hash_key(state.hash_key_file)
    if state.redis is not None:
        read_password(state.redis.password_file, "state.redis.password_file")
    if state.postgres is not None:
        connection_kwargs(state.postgres)


@asynccontextmanager
async def open_postgres(settings: Settings, metrics: Metrics | None = None) -> AsyncIterator[Postgres]:
    """The PostgreSQL pool alone (for the admin commands)."""
    db = Postgres(settings.state, metrics)
    await db.open()
    try:
        yield db
    finally:
        await db.close()


@asynccontextmanager
async def open_mapping_state(settings: Settings) -> AsyncIterator[SharedState]:
    """For the admin commands that map identities: the shared leases and last-known answers, without Redis."""
    state, identity = settings.state, settings.identity
    if state.backend != "shared" or state.postgres is None:
        yield SharedState()
        return
    namer = Namer(read_hash_key(state.hash_key_file))
    async with open_postgres(settings) as db:
        leases = SharedLeases(db, pool_accounts(identity), limits=pool_limits(identity)) if identity.pools else None
        remembering = {
            n: float(a.last_known_max_age_seconds) for n, a in identity.alise.items() if a.outage == "last_known"
        }
        yield SharedState(leases=leases, last_known=SharedLastKnown(db, namer, remembering) if remembering else None)


@asynccontextmanager
async def open_shared(settings: Settings, metrics: Metrics | None = None) -> AsyncIterator[SharedState]:
    """The shared implementations for ``state.backend: shared`` (nothing for ``embedded``); closed on exit."""
    state = settings.state
    if state.backend != "shared":
        yield SharedState()
        return
    assert state.redis is not None
    namer = Namer(read_hash_key(state.hash_key_file), state.redis.key_prefix)
    client = connect(state.redis)
    guard = redis_guard(state, client, metrics)
    db = Postgres(state, metrics) if state.postgres is not None else None
    try:
        rate_limits = SharedRateLimits(client, guard, namer, outage=state.rate_limit_outage, metrics=metrics)
        shield_cache = (
            SharedResponseCache(client, guard, namer, outage=state.shield_outage, metrics=metrics)
            if settings.shield.cache
            else None
        )
        identity = settings.identity
        leases = last_known = None
        if db is not None:
            await db.open()
            if identity.pools:
                leases = SharedLeases(db, pool_accounts(identity), limits=pool_limits(identity))
            remembering = {n: a for n, a in identity.alise.items() if a.outage == "last_known"}
            if remembering:
                max_ages = {n: float(a.last_known_max_age_seconds) for n, a in remembering.items()}
                size = max(a.cache_size for a in remembering.values())
                last_known = SharedLastKnown(db, namer, max_ages, size=size, metrics=metrics)
        await _probe(guard, client, db)
        yield SharedState(rate_limits, shield_cache, leases, last_known)
    finally:
        await guard.aclose()
        await client.aclose()
        if db is not None:
            await db.close()


async def _probe(guard: Guard, client: aioredis.Redis, db: Postgres | None) -> None:
    """Say at start-up whether the backends answer; the proxy starts either way and uses them once they do."""
    try:
        await guard.call("startup", client.ping)
        logger.info("Redis answers")
    except BackendDown as down:
        logger.error("%s at start-up; requests get the outage behaviour until it answers", down.detail)
    if db is not None:
        try:
            await db.run("startup", lambda conn: conn.execute("SELECT 1"))
            logger.info("PostgreSQL answers; the tables are in place")
        except BackendDown as down:
            logger.error("%s at start-up; requests that need it get 503 until it answers", down.detail)
