"""Everything a running proxy holds, built once at start-up and shared by all requests: one object per
stage (tokens, policy, identity, upstream, audit), the metrics, and the policy reloader.

The state the stages keep is theirs (embedded) unless ``state.backend: shared``: then
:func:`slurmproxy.state.open_state` builds the Redis and PostgreSQL implementations of the
interfaces the stages own, and this module hands them over (rate limits to the policy, leases and
ALISE's last-known answers to identity, the shared cache tier to the upstream's shield)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from slurmproxy.audit.log import AuditLog, AuditTrail
from slurmproxy.config.settings import Settings
from slurmproxy.config.warnings import config_warnings
from slurmproxy.identity import IdentityMapper, check_policy_backends, open_identity
from slurmproxy.observability.metrics import Metrics
from slurmproxy.observability.tracing import Tracing, open_tracing
from slurmproxy.policy import Authorizer, Policy, load_policy
from slurmproxy.policy.reload import PolicyReloader, reloading
from slurmproxy.state import SharedState, open_state
from slurmproxy.tokens import TokenValidator, build_validator
from slurmproxy.tokens.provider import ProviderClient
from slurmproxy.upstream import Upstream

logger = logging.getLogger("slurmproxy")


@dataclass
class Runtime:
    settings: Settings
    tokens: TokenValidator
    authorizer: Authorizer
    mapper: IdentityMapper
    upstream: Upstream
    trail: AuditTrail
    metrics: Metrics
    policy_reloader: PolicyReloader | None = None  # swaps the authorizer's policy on SIGHUP and file changes
    tracing: Tracing | None = None  # None: tracing is off (tracing.endpoint unset), and costs nothing

    @property
    def policy(self) -> Policy:
        """The policy in force now (a request keeps the one it started with)."""
        return self.authorizer.policy

    @property
    def providers(self) -> list[ProviderClient]:
        return list(self.tokens.providers.values())


def load_runtime_policy(settings: Settings) -> Policy:
    """The policy as the proxy loads it: issuers must be configured, and so must the ALISE services and
    pools its mapping steps name."""
    policy = load_policy(settings.policy.paths, trusted_issuers=[i.issuer for i in settings.oidc.issuers])
    check_policy_backends(policy, settings.identity)
    return policy


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """Build the runtime; close every client and file on exit."""
    metrics = Metrics()
    policy = load_runtime_policy(settings)
    metrics.policy_load(True, rules=len(policy.rules))
    for warning in config_warnings(settings):
        logger.warning("configuration: %s", warning)
    for warning in policy.warnings:
        logging.getLogger("slurmproxy.policy").warning("policy: %s", warning)
    async with open_state(settings, metrics) as state, _open_stages(settings, metrics, policy, state) as runtime:
        yield runtime


@asynccontextmanager
async def _open_stages(
    settings: Settings, metrics: Metrics, policy: Policy, state: SharedState
) -> AsyncIterator[Runtime]:
    upstream = Upstream(settings, metrics, shared_cache=state.shield_cache)  # reads the Slurm credential
    log = AuditLog(settings.audit, metrics)
    log.open()
    provider_http = httpx.AsyncClient(
        timeout=settings.oidc.http_timeout_seconds,
        follow_redirects=False,
        trust_env=False,
        transport=metrics.transport("provider"),
    )
    tokens: TokenValidator | None = None
    tracing: Tracing | None = None
    try:
        tracing = open_tracing(settings.tracing)
        tokens = build_validator(settings, provider_http, metrics)
        upstream.start()
        async with open_identity(
            settings.identity, metrics, leases=state.leases, last_known=state.last_known
        ) as mapper:
            authorizer = Authorizer(
                policy, max_body_bytes=settings.server.max_body_bytes, rate_limits=state.rate_limits
            )
            runtime = Runtime(
                settings=settings,
                tokens=tokens,
                authorizer=authorizer,
                mapper=mapper,
                upstream=upstream,
                trail=AuditTrail(log, metrics),
                metrics=metrics,
                tracing=tracing,
            )
            runtime.policy_reloader = PolicyReloader(
                settings.policy.paths,
                lambda: load_runtime_policy(settings),
                lambda new: setattr(authorizer, "policy", new),
                policy,
                observe=lambda ok, rules: metrics.policy_load(ok, rules=rules),
            )
            async with reloading(runtime.policy_reloader, settings.policy.reload_interval_seconds):
                yield runtime
    finally:
        if tokens is not None:
            await tokens.aclose()
        await upstream.aclose()
        await provider_http.aclose()
        log.close()
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)  # the last spans, within the exporter's timeout
