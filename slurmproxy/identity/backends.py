"""Assembly of the mapping backends from the configuration, and the checks run before start-up."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from slurmproxy.config.settings import IdentitySettings
from slurmproxy.errors import ConfigError, PolicyError
from slurmproxy.identity.alise import AliseClient, LastKnownStore, read_apikey
from slurmproxy.identity.guard import AccountGuard
from slurmproxy.identity.mapper import IdentityMapper
from slurmproxy.identity.pool import LeaseBackend, LeaseStore, PoolLimits, Pools
from slurmproxy.policy.rules import Policy

if TYPE_CHECKING:
    from slurmproxy.observability.metrics import Metrics


def check_policy_backends(policy: Policy, settings: IdentitySettings) -> None:
    """Every ``alise:`` and ``pool:`` step names a configured backend; PolicyError lists those that do not."""
    configured: dict[str, set[str]] = {"alise": set(settings.alise), "pool": set(settings.pools)}
    section = {"alise": "identity.alise", "pool": "identity.pools"}
    errors = []
    for rule in policy.rules:
        for n, step in enumerate(rule.mapping):
            if step.kind in configured and step.target not in configured[step.kind]:
                known = ", ".join(sorted(configured[step.kind])) or "none"
                errors.append(
                    f"{rule.source}: rule {rule.id}: mapping[{n}]: {step.kind} {step.target!r} is not configured "
                    f"under {section[step.kind]} (configured: {known})"
                )
    if errors:
        raise PolicyError(errors)


def check_identity_config(settings: IdentitySettings) -> None:
    """What start-up would trip over: unreadable ALISE keys, a lease database that cannot be created."""
    for alise in settings.alise.values():
        read_apikey(alise)
    database = settings.pool_database
    if database is not None:
        parent = database.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK) or (database.exists() and not os.access(database, os.W_OK)):
            raise ConfigError(f"identity.pool_database: {database} cannot be created or written")


def pool_limits(settings: IdentitySettings) -> dict[str, PoolLimits]:
    """Each pool's limits on new leases, as both lease stores take them."""
    return {
        name: PoolLimits(pool.idle_expiry_seconds, pool.max_new_leases, pool.new_lease_period_seconds)
        for name, pool in settings.pools.items()
    }


def pool_accounts(settings: IdentitySettings) -> dict[str, tuple[str, ...]]:
    return {name: pool.accounts for name, pool in settings.pools.items()}


def open_lease_store(settings: IdentitySettings) -> LeaseStore | None:
    if settings.pool_database is None:
        return None
    return LeaseStore(settings.pool_database, pool_accounts(settings), limits=pool_limits(settings)).open()


@asynccontextmanager
async def open_identity(
    settings: IdentitySettings,
    metrics: Metrics | None = None,
    *,
    leases: LeaseBackend | None = None,
    last_known: LastKnownStore | None = None,
) -> AsyncIterator[IdentityMapper]:
    """The mapper with its ALISE clients and lease store; closes what it opened on exit.

    ``leases`` and ``last_known`` are the shared stores (``slurmproxy.state``) when the pipeline
    wires them; without them, the embedded ones: the SQLite lease file and each client's memory.
    """
    alise: dict[str, AliseClient] = {}
    store = None
    try:
        for name, alise_settings in settings.alise.items():
            alise[name] = AliseClient.create(name, alise_settings, metrics=metrics, last_known=last_known)
        if leases is None and settings.pools:
            store = open_lease_store(settings)
            leases = Pools(store) if store is not None else None
        yield IdentityMapper(AccountGuard(settings), alise=alise, pools=leases)
    finally:
        for client in alise.values():
            await client.aclose()
        if store is not None:
            store.close()
