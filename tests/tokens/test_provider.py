from __future__ import annotations

import asyncio

import httpx
import pytest
from pytest_httpx import HTTPXMock

from slurmproxy.config.settings import IssuerSettings, OidcSettings
from slurmproxy.errors import DependencyError
from slurmproxy.tokens.provider import ProviderClient
from tests.helpers import ISSUER, JWKS_URI, Signer, discovery

OIDC = OidcSettings(http_timeout_seconds=1)

pytestmark = pytest.mark.anyio
DISCOVERY = f"{ISSUER}/.well-known/openid-configuration"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _provider(http: httpx.AsyncClient, clock: Clock, **kw: object) -> ProviderClient:
    return ProviderClient(IssuerSettings(issuer=ISSUER, **kw), http, OIDC, clock=clock)


def _keys_then_rotation(httpx_mock: HTTPXMock) -> None:
    """The provider serves key "old", then only key "new"."""
    httpx_mock.add_response(url=DISCOVERY, json=discovery())
    httpx_mock.add_response(url=JWKS_URI, json=Signer(kid="old").jwks())
    httpx_mock.add_response(url=JWKS_URI, json=Signer(kid="new").jwks())


def _keys_then_outage(httpx_mock: HTTPXMock) -> None:
    """The provider serves its keys once, then is down."""
    httpx_mock.add_response(url=DISCOVERY, json=discovery())
    httpx_mock.add_response(url=JWKS_URI, json=Signer().jwks())
    httpx_mock.add_exception(httpx.ConnectError("down"), url=JWKS_URI, is_reusable=True)


async def test_unknown_kid_refetches_at_most_once_per_interval(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    httpx_mock.add_response(url=DISCOVERY, json=discovery())
    httpx_mock.add_response(url=JWKS_URI, json=signer.jwks(), is_reusable=True)
    clock = Clock()
    async with httpx.AsyncClient() as http:
        provider = _provider(http, clock)
        assert await provider.key_for("key-1") is not None
        clock.now += 61
        results = await asyncio.gather(*(provider.key_for(f"random-{n}") for n in range(1000)))
    assert results == [None] * 1000
    jwks_fetches = [r for r in httpx_mock.get_requests() if str(r.url) == JWKS_URI]
    assert len(jwks_fetches) == 2  # the initial load, then one refetch for the whole flood


async def test_rotated_key_is_picked_up_after_the_interval(httpx_mock: HTTPXMock) -> None:
    _keys_then_rotation(httpx_mock)
    clock = Clock()
    async with httpx.AsyncClient() as http:
        provider = _provider(http, clock)
        assert await provider.key_for("old") is not None
        assert await provider.key_for("new") is None  # within the interval: no refetch
        clock.now += 61
        assert await provider.key_for("new") is not None
        assert await provider.key_for("old") is None


async def test_stale_keys_keep_verifying_while_the_provider_is_down(httpx_mock: HTTPXMock) -> None:
    _keys_then_outage(httpx_mock)
    clock = Clock()
    async with httpx.AsyncClient() as http:
        provider = _provider(http, clock)
        key = await provider.key_for("key-1")
        assert key is not None
        clock.now += 4000  # the key set is stale and the provider is down
        assert await provider.key_for("key-1") is key  # answered at once; the refresh runs in the background
        await provider.settle()
        assert await provider.key_for("key-1") is key
        await provider.settle()
    jwks_fetches = [r for r in httpx_mock.get_requests() if str(r.url) == JWKS_URI]
    assert len(jwks_fetches) == 2  # the load, one failed refresh; then it backs off


async def test_stale_key_set_is_replaced_in_the_background(httpx_mock: HTTPXMock) -> None:
    _keys_then_rotation(httpx_mock)
    clock = Clock()
    async with httpx.AsyncClient() as http:
        provider = _provider(http, clock)
        old_key = await provider.key_for("old")
        assert old_key is not None and provider.key_is_current("old", old_key)
        clock.now += 3600
        assert await provider.key_for("old") is old_key  # still published as far as we know
        await provider.settle()
        assert not provider.key_is_current("old", old_key)  # the provider dropped it
        assert await provider.key_for("new") is not None


async def test_an_unchanged_key_keeps_its_identity_across_fetches(httpx_mock: HTTPXMock) -> None:
    signer, impostor = Signer(), Signer()
    same_with_metadata = {"keys": [{**signer.jwks()["keys"][0], "x5t": "abc", "alg": "RS256"}]}
    httpx_mock.add_response(url=DISCOVERY, json=discovery())
    httpx_mock.add_response(url=JWKS_URI, json=signer.jwks())
    httpx_mock.add_response(url=JWKS_URI, json=same_with_metadata)
    httpx_mock.add_response(url=JWKS_URI, json=impostor.jwks())  # same kid, other key
    async with httpx.AsyncClient() as http:
        provider = _provider(http, Clock())
        key = await provider.key_for("key-1")
        assert key is not None
        await provider.refresh_keys(force=True)
        assert provider.key_is_current("key-1", key)
        await provider.refresh_keys(force=True)
        assert not provider.key_is_current("key-1", key)


async def test_unknown_kid_during_an_outage_is_503_and_the_provider_is_not_hammered(httpx_mock: HTTPXMock) -> None:
    _keys_then_outage(httpx_mock)
    clock = Clock()
    async with httpx.AsyncClient() as http:
        provider = _provider(http, clock)
        assert await provider.key_for("key-1") is not None
        clock.now += 61
        results = await asyncio.gather(*(provider.key_for(f"new-{n}") for n in range(200)), return_exceptions=True)
        assert {getattr(r, "reason", None) for r in results} == {"provider_unreachable"}
        assert await provider.key_for("key-1") is not None  # known keys still verify
        clock.now += 6  # after the back-off, one more attempt
        with pytest.raises(DependencyError):
            await provider.key_for("new-x")
    jwks_fetches = [r for r in httpx_mock.get_requests() if str(r.url) == JWKS_URI]
    assert len(jwks_fetches) == 3


async def test_first_load_failure_is_retried_after_the_back_off(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    httpx_mock.add_response(url=DISCOVERY, json=discovery())
    httpx_mock.add_exception(httpx.ConnectError("down"), url=JWKS_URI)
    httpx_mock.add_response(url=JWKS_URI, json=signer.jwks())
    clock = Clock()
    async with httpx.AsyncClient() as http:
        provider = _provider(http, clock)
        for _ in range(3):
            with pytest.raises(DependencyError):
                await provider.key_for("key-1")
        clock.now += 5
        assert await provider.key_for("key-1") is not None


@pytest.mark.parametrize(
    ("issuer", "uri", "usable"),
    [
        pytest.param(ISSUER, f"{ISSUER}/userinfo", True, id="https"),
        pytest.param(ISSUER, "http://idp.example.org/userinfo", False, id="http-from-https-issuer"),
        pytest.param(ISSUER, "ftp://idp.example.org/userinfo", False, id="not-http"),
        pytest.param("http://127.0.0.1:8080", "http://127.0.0.1:8080/userinfo", True, id="http-dev-issuer"),
    ],
)
async def test_discovered_endpoints_must_be_usable(httpx_mock: HTTPXMock, issuer: str, uri: str, usable: bool) -> None:
    httpx_mock.add_response(
        url=f"{issuer}/.well-known/openid-configuration", json={**discovery(issuer), "userinfo_endpoint": uri}
    )
    async with httpx.AsyncClient() as http:
        provider = ProviderClient(IssuerSettings(issuer=issuer), http, OIDC)
        if usable:
            assert await provider.endpoint("userinfo_endpoint") == uri
        else:
            with pytest.raises(DependencyError):
                await provider.endpoint("userinfo_endpoint")


async def test_configured_endpoint_needs_no_discovery(httpx_mock: HTTPXMock) -> None:
    async with httpx.AsyncClient() as http:
        settings = IssuerSettings(issuer=ISSUER, userinfo_endpoint="https://idp.example.org/ui")
        provider = ProviderClient(settings, http, OIDC)
        assert await provider.endpoint("userinfo_endpoint") == "https://idp.example.org/ui"
    assert httpx_mock.get_requests() == []


async def test_discovery_must_name_the_configured_issuer(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=DISCOVERY, json=discovery("https://evil.example.org"))
    async with httpx.AsyncClient() as http:
        with pytest.raises(DependencyError, match="different issuer"):
            await _provider(http, Clock()).key_for("key-1")


async def test_explicit_jwks_uri_skips_discovery(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    httpx_mock.add_response(url="https://keys.example.org/jwks", json=signer.jwks())
    async with httpx.AsyncClient() as http:
        provider = _provider(http, Clock(), jwks_uri="https://keys.example.org/jwks")
        assert await provider.key_for("key-1") is not None


@pytest.mark.parametrize(
    ("entry", "usable"),
    [
        pytest.param({"kty": "oct", "k": "c2VjcmV0", "kid": "key-1"}, False, id="symmetric-key-ignored"),
        pytest.param({"kty": "RSA", "kid": "key-1", "use": "enc"}, False, id="encryption-key-ignored"),
        pytest.param({"kty": "RSA", "kid": "key-1", "n": "!!", "e": "AQAB"}, False, id="broken-key-ignored"),
    ],
)
async def test_unusable_jwks_entries_are_ignored(httpx_mock: HTTPXMock, entry: dict[str, str], usable: bool) -> None:
    httpx_mock.add_response(url=DISCOVERY, json=discovery())
    httpx_mock.add_response(url=JWKS_URI, json={"keys": [entry]})
    async with httpx.AsyncClient() as http:
        assert (await _provider(http, Clock()).key_for("key-1") is not None) is usable


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        pytest.param({"status_code": 500}, "provider_error", id="http-500"),
        pytest.param({"content": b"<html>"}, "provider_error", id="not-json"),
        pytest.param({"json": ["a"]}, "provider_error", id="not-object"),
    ],
)
async def test_bad_provider_answers_are_503(httpx_mock: HTTPXMock, response: dict[str, object], reason: str) -> None:
    httpx_mock.add_response(url=DISCOVERY, **response)  # type: ignore[arg-type]
    async with httpx.AsyncClient() as http:
        with pytest.raises(DependencyError) as err:
            await _provider(http, Clock()).key_for("key-1")
    assert err.value.reason == reason


async def test_timeout_is_reported_as_provider_timeout(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_exception(httpx.ReadTimeout("slow"))
    async with httpx.AsyncClient() as http:
        with pytest.raises(DependencyError) as err:
            await _provider(http, Clock()).key_for("key-1")
    assert err.value.reason == "provider_timeout"


async def test_discovery_failure_is_single_flight_and_backs_off(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_exception(httpx.ConnectError("down"), url=DISCOVERY)
    httpx_mock.add_response(url=DISCOVERY, json={**discovery(), "userinfo_endpoint": f"{ISSUER}/userinfo"})
    clock = Clock()
    async with httpx.AsyncClient() as http:
        provider = _provider(http, clock)
        results = await asyncio.gather(
            *(provider.endpoint("userinfo_endpoint") for _ in range(50)), return_exceptions=True
        )
        assert {getattr(r, "reason", None) for r in results} == {"provider_unreachable"}
        assert len(httpx_mock.get_requests()) == 1
        clock.now += 5
        assert await provider.endpoint("userinfo_endpoint") == f"{ISSUER}/userinfo"
        assert await provider.endpoint("jwks_uri") == JWKS_URI
    assert len(httpx_mock.get_requests()) == 2
