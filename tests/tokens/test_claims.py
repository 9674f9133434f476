from __future__ import annotations

import base64
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from pytest_httpx import HTTPXMock

from slurmproxy.config.settings import IssuerSettings, OidcSettings
from slurmproxy.errors import AuthenticationError, ConfigError, DependencyError
from slurmproxy.tokens.claims import ClaimSources, basic_auth, read_client_secret, read_client_secrets, resolve
from slurmproxy.tokens.provider import ProviderClient
from tests.helpers import ISSUER, VO_MEMBER

pytestmark = pytest.mark.anyio
USERINFO = f"{ISSUER}/protocol/openid-connect/userinfo"
INTROSPECT = f"{ISSUER}/protocol/openid-connect/token/introspect"
TOKEN = "opaque-token-value"
SECRET = "s3cret"


def _sources(http: httpx.AsyncClient, secret: str | None = SECRET, **issuer: Any) -> ClaimSources:
    settings = IssuerSettings(
        issuer=ISSUER,
        userinfo_endpoint=USERINFO,
        introspection_endpoint=INTROSPECT,
        client_id="slurm proxy",
        client_secret_file=Path("/nonexistent"),
        **issuer,
    )
    return ClaimSources(ProviderClient(settings, http, OidcSettings(http_timeout_seconds=1)), secret)


async def test_userinfo_sends_the_token_as_bearer_and_returns_claims(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=USERINFO, json={"sub": "carol", "eduperson_entitlement": [VO_MEMBER]})
    async with httpx.AsyncClient() as http:
        claims = await _sources(http).userinfo(TOKEN)
    assert claims["eduperson_entitlement"] == [VO_MEMBER]
    request = httpx_mock.get_request()
    assert request is not None and request.method == "GET"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert TOKEN not in str(request.url)


@pytest.mark.parametrize(
    ("response", "error", "reason"),
    [
        pytest.param({"status_code": 401}, AuthenticationError, "userinfo_rejected", id="401-token-refused"),
        pytest.param({"status_code": 403}, AuthenticationError, "userinfo_rejected", id="403-insufficient-scope"),
        pytest.param({"status_code": 400}, DependencyError, "provider_error", id="400-not-the-tokens-fault"),
        pytest.param({"status_code": 500}, DependencyError, "provider_error", id="500"),
        pytest.param({"status_code": 502}, DependencyError, "provider_error", id="502"),
        pytest.param({"content": b"<html>"}, DependencyError, "provider_error", id="not-json"),
        pytest.param(
            {"content": b"eyJ.signed.jwt", "headers": {"content-type": "application/jwt"}},
            DependencyError,
            "provider_error",
            id="signed-userinfo",
        ),
        pytest.param({"content": b"x" * (600 * 1024)}, DependencyError, "provider_error", id="too-large"),
    ],
)
async def test_userinfo_failures(
    httpx_mock: HTTPXMock, response: dict[str, Any], error: type[Exception], reason: str
) -> None:
    httpx_mock.add_response(url=USERINFO, **response)
    async with httpx.AsyncClient() as http:
        with pytest.raises(error) as err:
            await _sources(http).userinfo(TOKEN)
    assert getattr(err.value, "reason", None) == reason
    assert TOKEN not in str(err.value)


@pytest.mark.parametrize(
    ("exception", "reason"),
    [
        pytest.param(httpx.ConnectError("refused"), "provider_unreachable", id="unreachable"),
        pytest.param(httpx.ReadTimeout("slow"), "provider_timeout", id="timeout"),
        pytest.param(httpx.ConnectTimeout("slow"), "provider_timeout", id="connect-timeout"),
        pytest.param(httpx.RemoteProtocolError("closed"), "provider_unreachable", id="closed"),
    ],
)
async def test_provider_transport_failures_are_503(httpx_mock: HTTPXMock, exception: Exception, reason: str) -> None:
    httpx_mock.add_exception(exception, is_reusable=True)
    async with httpx.AsyncClient() as http:
        sources = _sources(http)
        for call in (sources.userinfo, sources.introspect):
            with pytest.raises(DependencyError) as err:
                await call(TOKEN)
            assert err.value.status_code == 503 and err.value.reason == reason


async def test_every_provider_call_has_a_timeout(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=USERINFO, json={"sub": "a"})
    httpx_mock.add_response(url=INTROSPECT, json={"active": True})
    async with httpx.AsyncClient(timeout=None) as http:  # noqa: S113 - a client without a default timeout
        sources = _sources(http)
        await sources.userinfo(TOKEN)
        await sources.introspect(TOKEN)
    for request in httpx_mock.get_requests():
        assert request.extensions["timeout"] == httpx.Timeout(1.0).as_dict()


async def test_introspection_with_client_secret_basic(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=INTROSPECT, method="POST", json={"active": True, "sub": "alice", "iss": ISSUER})
    async with httpx.AsyncClient() as http:
        answer = await _sources(http, secret="p@ss:wörd").introspect(TOKEN)
    assert answer["sub"] == "alice"
    request = httpx_mock.get_request()
    assert request is not None
    assert parse_qs(request.content.decode()) == {"token": [TOKEN], "token_type_hint": ["access_token"]}
    # RFC 6749 §2.3.1: both parts form-encoded before base64.
    decoded = base64.b64decode(request.headers["authorization"].removeprefix("Basic ")).decode()
    assert decoded == "slurm%20proxy:p%40ss%3Aw%C3%B6rd"


async def test_introspection_with_client_secret_post(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=INTROSPECT, method="POST", json={"active": True})
    async with httpx.AsyncClient() as http:
        await _sources(http, client_auth_method="client_secret_post").introspect(TOKEN)
    request = httpx_mock.get_request()
    assert request is not None and "authorization" not in request.headers
    form = parse_qs(request.content.decode())
    assert form["client_id"] == ["slurm proxy"] and form["client_secret"] == ["s3cret"]


@pytest.mark.parametrize(
    ("response", "error", "reason"),
    [
        pytest.param({"json": {"active": False}}, AuthenticationError, "token_inactive", id="inactive"),
        pytest.param({"json": {"active": "true"}}, AuthenticationError, "token_inactive", id="active-not-bool"),
        pytest.param({"json": {}}, AuthenticationError, "token_inactive", id="no-active"),
        pytest.param(
            {"json": {"active": True, "iss": "https://other"}}, AuthenticationError, "untrusted_issuer", id="other-iss"
        ),
        pytest.param({"status_code": 401}, DependencyError, "provider_error", id="our-credentials-refused"),
        pytest.param({"status_code": 400}, DependencyError, "provider_error", id="bad-request"),
        pytest.param({"json": ["active"]}, DependencyError, "provider_error", id="not-an-object"),
    ],
)
async def test_introspection_answers(
    httpx_mock: HTTPXMock, response: dict[str, Any], error: type[Exception], reason: str
) -> None:
    httpx_mock.add_response(url=INTROSPECT, method="POST", **response)
    async with httpx.AsyncClient() as http:
        with pytest.raises(error) as err:
            await _sources(http).introspect(TOKEN)
    assert getattr(err.value, "reason", None) == reason


async def test_introspection_without_a_secret_makes_no_request(httpx_mock: HTTPXMock) -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(DependencyError):
            await _sources(http, secret=None).introspect(TOKEN)
    assert httpx_mock.get_requests() == []


async def test_resolve_reads_each_part_from_its_source(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=USERINFO, json={"sub": "carol", "eduperson_entitlement": [VO_MEMBER]})
    async with httpx.AsyncClient() as http:
        sources = _sources(http, subject_source="token", entitlements_source="userinfo")
        identity = await resolve(sources.settings, sources, TOKEN, {"sub": "carol", "voperson_id": "x"})
    assert identity.subject == "carol"
    assert identity.entitlements == (VO_MEMBER,)
    assert identity.userinfo is not None and identity.introspection is None


async def test_resolve_fetches_userinfo_and_introspection_concurrently_once_each(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=USERINFO, json={"sub": "carol", "voperson_id": "carol@egi.eu"})
    httpx_mock.add_response(url=INTROSPECT, json={"active": True, "sub": "carol", "entitlements": [VO_MEMBER]})
    async with httpx.AsyncClient() as http:
        sources = _sources(
            http, subject_source="userinfo", subject_claim=["voperson_id", "sub"], entitlements_source="introspection"
        )
        identity = await resolve(sources.settings, sources, TOKEN, {"sub": "carol"})
    assert identity.subject == "carol@egi.eu"
    assert identity.entitlements == (VO_MEMBER,)
    assert sorted(str(r.url) for r in httpx_mock.get_requests()) == sorted([USERINFO, INTROSPECT])


async def test_resolve_with_token_sources_makes_no_request(httpx_mock: HTTPXMock) -> None:
    async with httpx.AsyncClient() as http:
        sources = _sources(http)
        identity = await resolve(sources.settings, sources, TOKEN, {"sub": "a", "entitlements": [VO_MEMBER]})
    assert identity.subject == "a" and identity.entitlements == (VO_MEMBER,)
    assert httpx_mock.get_requests() == []


async def test_userinfo_about_another_subject_is_refused(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=USERINFO, json={"sub": "mallory", "eduperson_entitlement": [VO_MEMBER]})
    async with httpx.AsyncClient() as http:
        sources = _sources(http, entitlements_source="userinfo")
        with pytest.raises(DependencyError) as err:
            await resolve(sources.settings, sources, TOKEN, {"sub": "carol"})
    assert err.value.reason == "provider_error"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(b"s3cret\n", None, id="trailing-newline"),
        pytest.param(b"", "not a client secret", id="empty"),
        pytest.param(b"two words", "not a client secret", id="space"),
        pytest.param(b"a" * 5000, "not a client secret", id="too-large"),
        pytest.param(None, "cannot read", id="missing"),
    ],
)
def test_read_client_secret(tmp_path: Path, content: bytes | None, problem: str | None) -> None:
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    if problem is None:
        assert read_client_secret(path) == "s3cret"
        return
    with pytest.raises(ConfigError) as err:
        read_client_secret(path)
    assert problem in err.value.detail and str(path) in err.value.detail
    assert "two words" not in err.value.detail


def test_client_secrets_are_read_per_issuer(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("abc\n")
    oidc = OidcSettings(
        issuers=(
            IssuerSettings(
                issuer="https://a", accept_opaque_tokens=True, client_id="c", client_secret_file=tmp_path / "s"
            ),
            IssuerSettings(issuer="https://b"),
        )
    )
    assert read_client_secrets(oidc) == {"https://a": "abc"}


def test_basic_auth_header() -> None:
    assert basic_auth("a", "b") == "Basic " + base64.b64encode(b"a:b").decode()


async def test_repr_holds_no_secret() -> None:
    async with httpx.AsyncClient() as http:
        sources = _sources(http)
    assert SECRET not in repr(sources)
