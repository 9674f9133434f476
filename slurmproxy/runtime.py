"""Everything a running proxy holds, built once at start-up and shared by all requests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx

from slurmproxy.apiversions import ApiVersions
from slurmproxy.audit import AuditLog
from slurmproxy.credentials import SlurmCredentials, credentials_from
from slurmproxy.httpclient import ConnectionPool
from slurmproxy.identity import IdentityMapper, check_policy_backends, open_identity
from slurmproxy.metrics import Metrics
from slurmproxy.policy import Policy, load_policy
from slurmproxy.policy.reload import PolicyReloader, reloading
from slurmproxy.policy.stats import PolicyStats
from slurmproxy.provider import ProviderClient
from slurmproxy.ratelimit import RateLimiter
from slurmproxy.settings import Settings
from slurmproxy.shield import Shield, shield_from
from slurmproxy.tokens import TokenValidator, build_validator
from slurmproxy.upstream import create_client
from slurmproxy.upstreamauth import UpstreamAuthCheck


@dataclass
class Runtime:
    settings: Settings
    tokens: TokenValidator
    policy: Policy
    mapper: IdentityMapper
    credentials: SlurmCredentials
    upstream: ConnectionPool
    audit: AuditLog
    apis: ApiVersions
    upstream_auth: UpstreamAuthCheck
    metrics: Metrics
    policy_reloader: PolicyReloader | None = None  # swaps `policy` on SIGHUP and file changes
    policy_stats: PolicyStats = field(default_factory=PolicyStats)
    rate_limiter: RateLimiter = field(default_factory=RateLimiter)
    shield: Shield = field(default_factory=Shield)  # coalescing and the short response cache (shield.py)

    @property
    def api_versions(self) -> tuple[str, ...]:
        """The API versions slurmrestd serves (``("v0.0.40", "v0.0.41", "v0.0.42")``); empty until known."""
        return self.apis.versions

    @property
    def providers(self) -> list[ProviderClient]:
        return list(self.tokens.providers.values())


def load_runtime_policy(settings: Settings) -> Policy:
    policy = load_policy(settings.policy.paths, trusted_issuers=[i.issuer for i in settings.oidc.issuers])
    check_policy_backends(policy, settings.identity)
    return policy


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """Build the runtime; close every client and file on exit."""
    metrics = Metrics()
    policy = load_runtime_policy(settings)
    metrics.policy_load(True, rules=len(policy.rules))
    credentials = credentials_from(settings.upstream)
    audit = AuditLog(settings.audit, metrics)
    audit.open()
    provider_http = httpx.AsyncClient(
        timeout=settings.oidc.http_timeout_seconds,
        follow_redirects=False,
        trust_env=False,
        transport=metrics.transport("provider"),
    )
    upstream = create_client(settings.upstream)
    apis = ApiVersions(upstream, credentials, settings.upstream)
    tokens: TokenValidator | None = None
    try:
        tokens = build_validator(settings, provider_http, metrics)
        apis.start()  # reads slurmrestd's API versions in the background, then every refresh interval
        async with open_identity(settings.identity, metrics) as mapper:
            runtime = Runtime(
                settings=settings,
                tokens=tokens,
                policy=policy,
                mapper=mapper,
                credentials=credentials,
                upstream=upstream,
                audit=audit,
                apis=apis,
                upstream_auth=UpstreamAuthCheck(upstream),
                metrics=metrics,
                shield=shield_from(settings.shield),
            )
            runtime.policy_reloader = PolicyReloader(
                settings.policy.paths,
                lambda: load_runtime_policy(settings),
                lambda new: setattr(runtime, "policy", new),
                policy,
                observe=lambda ok, rules: metrics.policy_load(ok, rules=rules),
            )
            async with reloading(runtime.policy_reloader, settings.policy.reload_interval_seconds):
                yield runtime
    finally:
        await apis.aclose()
        if tokens is not None:
            await tokens.aclose()
        await upstream.aclose()
        await provider_http.aclose()
        audit.close()
