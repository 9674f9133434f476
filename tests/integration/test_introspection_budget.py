"""Issue 15, item 5, against the real provider: junk opaque tokens cost the provider a bounded number
of introspections (the review's 301 junk tokens caused 301 POSTs)."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import Iterator

import pytest

from devstack import SlurmCluster
from devstack.provider import OidcProvider, default_config
from devstack.proxy import ProxyServer
from tests.integration.conftest import ProxyFactory, call, proxy_config
from tests.integration.test_checkin_tokens import _burst, checkin_issuer, checkin_policy, reason

BURST = 5


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    with OidcProvider(tmp_path_factory.mktemp("oidc-budget"), default_config()) as own:
        yield own


@pytest.fixture(scope="module")
def budgeted(
    slurm: SlurmCluster, provider: OidcProvider, proxy_factory: ProxyFactory, tmp_path_factory: pytest.TempPathFactory
) -> ProxyServer:
    issuer = checkin_issuer(provider, tmp_path_factory.mktemp("secrets"))
    oidc = {
        "introspection_per_client_burst": BURST,
        "introspection_per_client_per_second": 0.001,  # no refill while the test runs
        "introspection_burst": 1000,
        "failure_cache_seconds": 600,  # a refused token stays remembered however slow the machine
    }
    config = proxy_config(slurm, [issuer], oidc=oidc)
    return proxy_factory(config, {"site.yaml": checkin_policy(issuer["issuer"])})


def test_301_junk_tokens_from_one_client_cost_the_provider_its_burst(
    budgeted: ProxyServer, provider: OidcProvider, api: str
) -> None:
    provider.reset_stats()
    junk = [secrets.token_urlsafe(32) for _ in range(301)]
    responses = asyncio.run(_burst(f"{budgeted.url}{api}/ping", junk, 20))
    outcomes = Counter(f"{r.status_code} {reason(r)}" for r in responses)
    assert outcomes == {"401 token_inactive": BURST, "429 introspection_rate_limited": 301 - BURST}, outcomes
    assert provider.stats()["introspection"] == BURST
    assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 429)

    malformed = call(budgeted, "GET", f"{api}/ping", token="too-short")
    assert malformed.status_code == 401 and reason(malformed) == "malformed_token"
    introspected = next(t for t, r in zip(junk, responses, strict=True) if r.status_code == 401)
    again = call(budgeted, "GET", f"{api}/ping", token=introspected)  # remembered: no new introspection
    assert again.status_code == 401 and reason(again) == "token_inactive"
    assert provider.stats()["introspection"] == BURST
