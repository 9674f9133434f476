"""Issue 15, item 5: junk opaque tokens cannot make the proxy hammer the provider's introspection.

Opaque tokens are shape-checked before any I/O, and tokens not seen before are introspected within a
budget: at most so many at once, so many per second in all, and so many per second per client address.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import httpx
import pytest
from pytest_httpx import HTTPXMock

from slurmproxy.config.settings import IssuerSettings, OidcSettings
from slurmproxy.errors import ProxyError
from slurmproxy.observability.metrics import Metrics
from slurmproxy.tokens.provider import ProviderClient
from slurmproxy.tokens.validator import TokenValidator

pytestmark = pytest.mark.anyio
ISSUER = "https://opaque.example.org"
INTROSPECT = f"{ISSUER}/introspect"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def validator(http: httpx.AsyncClient, clock: Clock, metrics: Metrics | None = None, **oidc: Any) -> TokenValidator:
    issuer = IssuerSettings(
        issuer=ISSUER,
        accept_opaque_tokens=True,
        entitlements_source="introspection",
        introspection_endpoint=INTROSPECT,
        client_id="slurmproxy",
        client_secret_file="/run/secrets/unused",
        **oidc.pop("issuer", {}),
    )
    settings = OidcSettings(http_timeout_seconds=5, **oidc)
    provider = ProviderClient(issuer, http, settings, clock=clock)
    return TokenValidator(
        {ISSUER: provider},
        settings,
        max_token_bytes=16384,
        clock=clock,
        client_secrets={ISSUER: "s3cret"},
        metrics=metrics,
    )


def junk() -> str:
    """Shaped like an opaque token (oidc-provider's: 43 base64url characters), active nowhere."""
    return secrets.token_urlsafe(32)


def introspections(httpx_mock: HTTPXMock) -> int:
    return sum(1 for r in httpx_mock.get_requests() if str(r.url) == INTROSPECT)


async def reason(v: TokenValidator, token: str, client: str | None = "198.51.100.7") -> str:
    with pytest.raises(ProxyError) as err:
        await v.authenticate([f"Bearer {token}"], client=client)
    return f"{err.value.status_code} {err.value.reason}"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("short", id="too-short"),
        pytest.param("x" * 5000, id="too-long"),
        pytest.param("eyJhbGciOiJSUzI1NiJ9.eyJ6Ijoi.c2ln", id="a-broken-jwt"),
        pytest.param("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0", id="a-jwt-of-two-segments"),
    ],
)
async def test_tokens_no_provider_would_issue_are_refused_without_introspection(
    httpx_mock: HTTPXMock, token: str
) -> None:
    async with httpx.AsyncClient() as http:
        assert await reason(validator(http, Clock()), token) == "401 malformed_token"
    assert introspections(httpx_mock) == 0


async def test_a_random_token_starting_like_a_jwt_is_still_opaque(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=INTROSPECT, json={"active": False})
    async with httpx.AsyncClient() as http:
        assert await reason(validator(http, Clock()), "eyJ" + "a" * 40) == "401 token_inactive"


async def test_an_issuers_opaque_token_pattern_narrows_the_shape(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=INTROSPECT, json={"active": False})
    async with httpx.AsyncClient() as http:
        v = validator(http, Clock(), issuer={"opaque_token_pattern": "[A-Za-z0-9_-]{43}"})
        assert await reason(v, "a" * 42) == "401 malformed_token"
        assert await reason(v, junk()) == "401 token_inactive"
    assert introspections(httpx_mock) == 1


async def test_new_tokens_of_one_client_are_introspected_within_its_budget(httpx_mock: HTTPXMock) -> None:
    """The review's 301 junk tokens caused 301 introspection POSTs; now one client gets its burst."""
    httpx_mock.add_response(url=INTROSPECT, json={"active": False}, is_reusable=True)
    clock, metrics = Clock(), Metrics()
    async with httpx.AsyncClient() as http:
        v = validator(
            http,
            clock,
            metrics,
            introspection_per_client_per_second=1,
            introspection_per_client_burst=3,
            introspection_per_second=100,
            introspection_burst=100,
        )
        seen = [junk() for _ in range(3)]
        answers = [await reason(v, token) for token in [*seen, junk(), junk()]]
        assert answers == ["401 token_inactive"] * 3 + ["429 introspection_rate_limited"] * 2
        assert await reason(v, seen[0]) == "401 token_inactive"  # remembered: no new introspection
        assert await reason(v, junk(), client="203.0.113.9") == "401 token_inactive"  # another client
        assert introspections(httpx_mock) == 4
        clock.now += 1.0  # a second later, one more
        assert await reason(v, junk()) == "401 token_inactive"
        assert await reason(v, junk()) == "429 introspection_rate_limited"
    assert introspections(httpx_mock) == 5
    text = metrics.render().decode()
    assert 'slurmproxy_introspection_refusals_total{reason="introspection_rate_limited"} 3.0' in text


async def test_new_tokens_from_everyone_are_introspected_within_the_global_budget(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=INTROSPECT, json={"active": False}, is_reusable=True)
    async with httpx.AsyncClient() as http:
        v = validator(http, Clock(), introspection_per_second=1, introspection_burst=2)
        answers = [await reason(v, junk(), client=f"198.51.100.{n}") for n in range(4)]
    assert answers == ["401 token_inactive"] * 2 + ["503 introspection_budget_exhausted"] * 2
    assert introspections(httpx_mock) == 2


async def test_introspections_at_once_are_capped(httpx_mock: HTTPXMock) -> None:
    release = asyncio.Event()
    started = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal started
        started += 1
        await release.wait()
        return httpx.Response(200, json={"active": False})

    httpx_mock.add_callback(slow, url=INTROSPECT, is_reusable=True)
    async with httpx.AsyncClient() as http:
        v = validator(http, Clock(), introspection_concurrency=2)
        held = [asyncio.create_task(reason(v, junk(), client=f"198.51.100.{n}")) for n in range(2)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while started < 2:
            assert loop.time() < deadline, "the two introspections did not start"
            await asyncio.sleep(0.01)
        assert await reason(v, junk(), client="198.51.100.9") == "503 introspection_busy"
        release.set()
        assert await asyncio.gather(*held) == ["401 token_inactive"] * 2
        assert await reason(v, junk(), client="198.51.100.9") == "401 token_inactive"  # slots given back
    assert introspections(httpx_mock) == 3


async def test_a_budget_refusal_is_not_remembered_for_the_token(httpx_mock: HTTPXMock) -> None:
    """A good token refused for the budget is introspected once the budget allows: never a cached refusal."""
    httpx_mock.add_response(url=INTROSPECT, json={"active": False})
    httpx_mock.add_response(url=INTROSPECT, json={"active": True, "token_type": "Bearer", "sub": "alice"})
    clock = Clock()
    async with httpx.AsyncClient() as http:
        v = validator(http, clock, introspection_per_client_per_second=1, introspection_per_client_burst=1)
        assert await reason(v, junk()) == "401 token_inactive"  # spends the client's burst
        good = junk()
        assert await reason(v, good) == "429 introspection_rate_limited"
        clock.now += 1.0
        principal = await v.authenticate([f"Bearer {good}"], client="198.51.100.7")
    assert principal.subject == "alice"
