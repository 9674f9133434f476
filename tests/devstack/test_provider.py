"""The devstack's OpenID provider (panva/oidc-provider), driven over HTTP as the proxy will."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from devstack import DevstackError
from devstack.provider import (
    MEMBER_ENTITLEMENT,
    PROXY_AUDIENCE,
    PROXY_CLIENT,
    PROXY_RESOURCE,
    OidcProvider,
)

pytestmark = pytest.mark.integration


def header_and_claims(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, payload, _sig = token.split(".")

    def part(segment: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        return data

    return part(head), part(payload)


def verify(provider: OidcProvider, token: str) -> dict[str, Any]:
    """Verify a token against the provider's published JWKS, as the proxy does."""
    keys = KeySet.import_key_set(provider.jwks())  # type: ignore[arg-type]
    claims: dict[str, Any] = jwt.decode(token, keys, algorithms=["RS256"]).claims
    return claims


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    with OidcProvider(tmp_path_factory.mktemp("oidc")) as prov:
        yield prov


def test_start_is_fast_and_discovery_matches_issuer(provider: OidcProvider) -> None:
    assert provider.startup_seconds < 2
    disco = httpx.get(provider.discovery_url).json()
    assert disco["issuer"] == provider.issuer
    assert disco["issuer"].startswith("http://127.0.0.1:")
    assert disco["userinfo_endpoint"].endswith("/protocol/openid-connect/userinfo")
    assert disco["introspection_endpoint"].endswith("/protocol/openid-connect/token/introspect")
    assert disco["jwks_uri"].endswith("/protocol/openid-connect/certs")
    assert "eduperson_entitlement" in disco["scopes_supported"]
    assert "eduperson_entitlement" in disco["claims_supported"]


def test_client_credentials_token_carries_entitlements(provider: OidcProvider) -> None:
    token = provider.client_credentials_token("alice-cli")
    head, _ = header_and_claims(token)
    assert head["alg"] == "RS256" and head["typ"] == "at+jwt" and head["kid"]
    claims = verify(provider, token)
    assert claims["iss"] == provider.issuer
    assert claims["sub"] == "alice"
    assert claims["aud"] == PROXY_AUDIENCE
    assert claims["client_id"] == "alice-cli"
    assert claims["eduperson_entitlement"] == [MEMBER_ENTITLEMENT]
    assert claims["exp"] > time.time()
    dave = verify(provider, provider.client_credentials_token("dave-cli"))
    assert dave["sub"] == "dave" and "eduperson_entitlement" not in dave


def test_login_token_is_checkin_shaped(provider: OidcProvider) -> None:
    token = provider.login("carol")
    head, _ = header_and_claims(token)
    assert head["alg"] == "RS256" and head["typ"] == "JWT"
    claims = verify(provider, token)
    assert claims["iss"] == provider.issuer and claims["sub"] == "carol"
    assert claims["client_id"] == "checkin-cli" and claims["azp"] == "checkin-cli"
    assert claims["typ"] == "Bearer"
    assert "eduperson_entitlement" in claims["scope"].split()
    assert "aud" not in claims
    assert not {"eduperson_entitlement", "entitlements", "email"} & claims.keys()
    info = provider.userinfo(token)
    assert info.status_code == 200, info.text
    assert info.json()["sub"] == "carol"
    assert MEMBER_ENTITLEMENT in info.json()["eduperson_entitlement"]
    assert info.json()["voperson_id"] == "carol@egi.eu"
    intro = provider.introspect(token)
    assert intro["active"] is True and intro["sub"] == "carol"
    assert MEMBER_ENTITLEMENT in intro["eduperson_entitlement"]


def test_login_with_resource_has_audience_and_still_works_at_userinfo(provider: OidcProvider) -> None:
    token = provider.login("alice", resource=PROXY_RESOURCE)
    claims = verify(provider, token)
    assert claims["aud"] == PROXY_AUDIENCE
    assert "eduperson_entitlement" not in claims
    assert provider.userinfo(token).json()["eduperson_entitlement"] == [MEMBER_ENTITLEMENT]


def test_scopes_govern_released_claims(provider: OidcProvider) -> None:
    token = provider.login("alice", scope="openid entitlements")
    info = provider.userinfo(token).json()
    assert info["entitlements"] == [MEMBER_ENTITLEMENT]
    assert "eduperson_entitlement" not in info and "email" not in info
    bare = provider.userinfo(provider.login("alice", scope="openid")).json()
    assert bare == {"sub": "alice"}
    dave = provider.userinfo(provider.login("dave")).json()
    assert "eduperson_entitlement" not in dave


def test_userinfo_and_introspection_refuse_bad_tokens(provider: OidcProvider) -> None:
    assert provider.userinfo("garbage").status_code == 401
    assert provider.introspect("garbage") == {"active": False}
    # Introspection needs a confidential client.
    resp = httpx.post(provider.endpoint("introspection"), data={"token": "x"}, auth=(PROXY_CLIENT, "wrong"))
    assert resp.status_code == 401


def test_opaque_token_introspection_and_revocation(provider: OidcProvider) -> None:
    token = provider.opaque_token("alice")
    assert token.count(".") == 0
    intro = provider.introspect(token)
    assert intro["active"] is True and intro["sub"] == "alice"
    assert intro["eduperson_entitlement"] == [MEMBER_ENTITLEMENT]
    assert provider.userinfo(token).status_code == 200
    provider.revoke(token)
    assert provider.introspect(token) == {"active": False}
    assert provider.userinfo(token).status_code == 401
    machine = provider.client_credentials_token("alice-cli-opaque")
    assert machine.count(".") == 0
    assert provider.introspect(machine)["eduperson_entitlement"] == [MEMBER_ENTITLEMENT]
    provider.revoke(machine)
    assert provider.introspect(machine) == {"active": False}


def test_revoked_jwt_is_inactive(provider: OidcProvider) -> None:
    token = provider.login("alice")
    provider.revoke(token)
    assert provider.introspect(token) == {"active": False}
    assert provider.userinfo(token).status_code == 401


def test_stats_count_calls(provider: OidcProvider) -> None:
    provider.reset_stats()
    assert set(provider.stats().values()) == {0}
    token = provider.client_credentials_token("alice-cli")
    provider.introspect(token)
    provider.introspect(token)
    httpx.get(provider.jwks_uri)
    httpx.get(provider.discovery_url)
    stats = provider.stats()
    assert stats["token"] == 1
    assert stats["introspection"] == 2
    assert stats["jwks"] == 1
    assert stats["discovery"] == 1
    assert stats["userinfo"] == 0


def test_rotation_keeps_tokens_and_publishes_both_keys(tmp_path: Path) -> None:
    with OidcProvider(tmp_path / "rot") as prov:
        old_token = prov.login("carol")
        old_kid = header_and_claims(old_token)[0]["kid"]
        assert old_kid == prov.current_kid
        new_kid = prov.rotate_keys()
        assert new_kid != old_kid
        assert [k["kid"] for k in prov.jwks()["keys"]] == [new_kid, old_kid]
        new_token = prov.client_credentials_token("alice-cli")
        assert header_and_claims(new_token)[0]["kid"] == new_kid
        verify(prov, old_token)
        verify(prov, new_token)
        # Issued-token state survives the rotation.
        assert prov.userinfo(old_token).status_code == 200
        assert prov.introspect(old_token)["active"] is True
        prov.drop_old_keys()
        assert [k["kid"] for k in prov.jwks()["keys"]] == [new_kid]
        # Restart: same port, same keys.
        port = prov.port
        prov.restart()
        assert prov.port == port and prov.current_kid == new_kid
        assert [k["kid"] for k in prov.jwks()["keys"]] == [new_kid]
        verify(prov, prov.client_credentials_token("alice-cli"))


def test_set_account_changes_userinfo(tmp_path: Path) -> None:
    with OidcProvider(tmp_path / "acct") as prov:
        token = prov.login("alice")
        prov.set_account("alice", {"email": "alice@example.org"})
        assert "eduperson_entitlement" not in prov.userinfo(token).json()


def test_start_failure_raises_with_stderr(tmp_path: Path) -> None:
    bad = {"accounts": {}, "clients": [{"client_id": "x", "grant_types": ["nonsense"]}]}
    prov = OidcProvider(tmp_path / "bad", bad)
    try:
        with pytest.raises(DevstackError, match="exited") as info:
            prov.start()
        assert "invalid client x" in str(info.value)
    finally:
        prov.stop()
