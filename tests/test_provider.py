from __future__ import annotations

import asyncio

import httpx
import pytest
from pytest_httpx import HTTPXMock

from slurmproxy.errors import DependencyError
from slurmproxy.provider import ProviderClient
from slurmproxy.settings import IssuerSettings
from tests.helpers import ISSUER, JWKS_URI, Signer, discovery

pytestmark = pytest.mark.anyio
DISCOVERY = f"{ISSUER}/.well-known/openid-configuration"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _provider(http: httpx.AsyncClient, clock: Clock, **kw: object) -> ProviderClient:
    return ProviderClient(
        IssuerSettings(issuer=ISSUER, **kw),
        http,
        timeout=1.0,
        cache_seconds=3600,
        min_refetch_seconds=60,
        clock=clock,
    )


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
    old, new = Signer(kid="old"), Signer(kid="new")
    httpx_mock.add_response(url=DISCOVERY, json=discovery())
    httpx_mock.add_response(url=JWKS_URI, json=old.jwks())
    httpx_mock.add_response(url=JWKS_URI, json=new.jwks())
    clock = Clock()
    async with httpx.AsyncClient() as http:
        provider = _provider(http, clock)
        assert await provider.key_for("old") is not None
        assert await provider.key_for("new") is None  # within the interval: no refetch
        clock.now += 61
        assert await provider.key_for("new") is not None
        assert await provider.key_for("old") is None


async def test_keys_survive_a_provider_outage_until_replaced(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    httpx_mock.add_response(url=DISCOVERY, json=discovery())
    httpx_mock.add_response(url=JWKS_URI, json=signer.jwks())
    httpx_mock.add_exception(httpx.ConnectError("down"), url=JWKS_URI, is_reusable=True)
    clock = Clock()
    async with httpx.AsyncClient() as http:
        provider = _provider(http, clock)
        assert await provider.key_for("key-1") is not None
        clock.now += 4000  # cache expired, provider down: cached keys still verify
        assert await provider.key_for("key-1") is not None


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
