"""Assembly of the mapping backends from the configuration, and the checks run before start-up."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from slurmproxy.config.settings import IdentitySettings
from slurmproxy.errors import ConfigError, PolicyError
from slurmproxy.identity.alise import AliseClient, read_apikey
from slurmproxy.identity.guard import AccountGuard
from slurmproxy.identity.mapper import IdentityMapper
from slurmproxy.identity.pool import LeaseStore, Pools
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


def open_lease_store(settings: IdentitySettings) -> LeaseStore | None:
    if settings.pool_database is None:
        return None
    return LeaseStore(settings.pool_database, {name: pool.accounts for name, pool in settings.pools.items()}).open()


@asynccontextmanager
async def open_identity(settings: IdentitySettings, metrics: Metrics | None = None) -> AsyncIterator[IdentityMapper]:
    """The mapper with its ALISE clients and lease database; closes them on exit."""
    alise: dict[str, AliseClient] = {}
    store = None
    try:
        for name, alise_settings in settings.alise.items():
            alise[name] = AliseClient.create(name, alise_settings, metrics=metrics)
        store = open_lease_store(settings) if settings.pools else None
        yield IdentityMapper(AccountGuard(settings), alise=alise, pools=Pools(store) if store else None)
    finally:
        for client in alise.values():
            await client.aclose()
        if store is not None:
            store.close()
