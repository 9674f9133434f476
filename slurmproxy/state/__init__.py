"""Shared state: what policies rely on, kept in Redis and PostgreSQL for every replica (``state.backend: shared``).

Entry point: :func:`open_state` builds, from the settings, the shared implementations of the
interfaces the stages own, and the pipeline (``pipeline.runtime``) hands them to the stages:

| interface (owned by)                          | shared implementation        | backend    |
|-----------------------------------------------|------------------------------|------------|
| ``policy.ratelimit.RateLimits``               | ``state.ratelimit``          | Redis      |
| ``upstream.shield.SharedCache``               | ``state.shield``             | Redis      |
| ``identity.pool.LeaseBackend``                | ``state.leases``             | PostgreSQL |
| ``identity.alise.LastKnownStore``             | ``state.lastknown``          | PostgreSQL |

With ``state.backend: embedded`` (the default) :func:`open_state` builds nothing and every stage
keeps its own in-process implementation, unchanged: one machine needs no server. Each call to a
backend is bounded and guarded (``state.guard``); what a failure means is each user's (see their
modules and docs/operations.md, "Scaling out").
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from slurmproxy.config.settings import Settings
from slurmproxy.state.api import SharedState

if TYPE_CHECKING:
    from slurmproxy.observability.metrics import Metrics
    from slurmproxy.state.postgres import Postgres

__all__ = ["SharedState", "check_state_config", "open_mapping_state", "open_postgres", "open_state"]
# The clients (redis-py, psycopg) are imported only for the shared backend: one machine loads none of them.


def check_state_config(settings: Settings) -> None:
    """What start-up would trip over: unreadable password or key files (ConfigError naming the setting)."""
    if settings.state.backend == "shared":
        from slurmproxy.state.shared import check_shared_config

        check_shared_config(settings)


@asynccontextmanager
async def open_state(settings: Settings, metrics: Metrics | None = None) -> AsyncIterator[SharedState]:
    """The shared implementations for ``state.backend: shared`` (nothing for ``embedded``); closed on exit."""
    if settings.state.backend != "shared":
        yield SharedState()
        return
    from slurmproxy.state.shared import open_shared

    async with open_shared(settings, metrics) as state:
        yield state


@asynccontextmanager
async def open_postgres(settings: Settings, metrics: Metrics | None = None) -> AsyncIterator[Postgres]:
    """The PostgreSQL pool alone (for the admin commands)."""
    from slurmproxy.state import shared

    async with shared.open_postgres(settings, metrics) as db:
        yield db


@asynccontextmanager
async def open_mapping_state(settings: Settings) -> AsyncIterator[SharedState]:
    """For the admin commands that map identities: the shared leases and last-known answers, without Redis."""
    if settings.state.backend != "shared" or settings.state.postgres is None:
        yield SharedState()
        return
    from slurmproxy.state import shared

    async with shared.open_mapping_state(settings) as state:
        yield state
