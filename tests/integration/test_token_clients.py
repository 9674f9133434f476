"""Issue 15, item 6, against the real provider: tokens meant for other services are refused.

A client allow-list (`clients`: the token's `azp`, RFC 9068 `client_id`) and the RFC 9068 header type
(`require_at_jwt`) on real tokens: oidc-provider's RFC 9068 access tokens (machine clients), its
Check-in-shaped ones (`typ: JWT` header, `azp`, no `aud`), and its ID tokens.
"""

from __future__ import annotations

import httpx
import pytest

from devstack import SlurmCluster
from devstack.provider import INTERACTIVE_CLIENT, PROXY_AUDIENCE, OidcProvider
from devstack.proxy import ProxyServer
from tests.integration.conftest import ProxyFactory, call, proxy_config, site_policy


@pytest.fixture(scope="module")
def strict(slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory) -> ProxyServer:
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE], "clients": ["alice-cli"], "require_at_jwt": True}
    return proxy_factory(proxy_config(slurm, [issuer]), {"site.yaml": site_policy(oidc.issuer)})


@pytest.fixture(scope="module")
def checkin_clients(slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory) -> ProxyServer:
    """The Check-in preset, replay-safe: only the portal's client (here the provider's interactive one)."""
    issuer = {"preset": "egi-checkin", "issuer": oidc.issuer, "clients": [INTERACTIVE_CLIENT]}
    return proxy_factory(proxy_config(slurm, [issuer]), {"site.yaml": site_policy(oidc.issuer)})


def reason(response: httpx.Response) -> str:
    return str(response.json()["slurmproxy"]["reason"])


def test_only_the_listed_clients_rfc9068_tokens_pass(strict: ProxyServer, oidc: OidcProvider, api: str) -> None:
    assert call(strict, "GET", f"{api}/ping", token=oidc.client_credentials_token("alice-cli")).status_code == 200
    other = call(strict, "GET", f"{api}/ping", token=oidc.client_credentials_token("dave-cli"))
    assert other.status_code == 401 and reason(other) == "wrong_client"


def test_tokens_that_are_not_rfc9068_access_tokens_are_refused(
    strict: ProxyServer, oidc: OidcProvider, api: str
) -> None:
    id_token = oidc.login_tokens("alice")["id_token"]
    checkin_shaped = oidc.login("alice")  # a valid access token, but its header says typ JWT
    for token in (id_token, checkin_shaped):
        response = call(strict, "GET", f"{api}/ping", token=token)
        assert response.status_code == 401 and reason(response) == "wrong_token_type"


def test_the_checkin_preset_with_a_client_list_accepts_its_clients_tokens_only(
    checkin_clients: ProxyServer, oidc: OidcProvider, api: str
) -> None:
    assert call(checkin_clients, "GET", f"{api}/ping", token=oidc.login("carol")).status_code == 200
    replayed = call(checkin_clients, "GET", f"{api}/ping", token=oidc.client_credentials_token("alice-cli"))
    assert replayed.status_code == 401 and reason(replayed) == "wrong_client"
