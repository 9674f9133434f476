from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey
from pytest_httpx import HTTPXMock

from slurmproxy.errors import AuthenticationError, BadRequestError, DependencyError, MissingTokenError
from slurmproxy.provider import ProviderClient
from slurmproxy.settings import IssuerSettings
from slurmproxy.tokens import TokenValidator, check_time_claims, extract_bearer
from tests.helpers import AUDIENCE, ISSUER, JWKS_URI, OTHER_ISSUER, VO_MEMBER, Signer, discovery

pytestmark = pytest.mark.anyio


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _validator(http: httpx.AsyncClient, **issuer: Any) -> TokenValidator:
    settings = IssuerSettings(issuer=ISSUER, audiences=(AUDIENCE,), **issuer)
    provider = ProviderClient(settings, http, timeout=1.0, cache_seconds=3600)
    return TokenValidator({ISSUER: provider}, max_token_bytes=16384)


def _serve_keys(httpx_mock: HTTPXMock, signer: Signer, *extra: Any) -> None:
    httpx_mock.add_response(url=f"{ISSUER}/.well-known/openid-configuration", json=discovery(), is_reusable=True)
    httpx_mock.add_response(url=JWKS_URI, json=signer.jwks(*extra), is_reusable=True)


async def test_valid_token_gives_principal_with_entitlements(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    token = signer.token()
    async with httpx.AsyncClient() as http:
        principal = await _validator(http).authenticate([f"Bearer {token}"])
    assert principal.issuer == ISSUER
    assert principal.subject == "alice@example.org"
    assert principal.entitlements == (VO_MEMBER,)
    assert [str(e) for e in principal.parsed_entitlements] == [VO_MEMBER]
    assert token not in repr(principal)
    assert token.split(".")[2] not in repr(principal)


@pytest.mark.parametrize(
    ("claims", "header", "reason"),
    [
        pytest.param({"exp": int(time.time()) - 120}, {}, "token_expired", id="expired"),
        pytest.param({"exp": None}, {}, "missing_exp", id="no-exp"),
        pytest.param({"nbf": int(time.time()) + 600}, {}, "token_not_yet_valid", id="nbf-future"),
        pytest.param({"iat": int(time.time()) + 3600}, {}, "token_issued_in_future", id="iat-future"),
        pytest.param({"aud": "someone-else"}, {}, "wrong_audience", id="wrong-aud"),
        pytest.param({"aud": None}, {}, "wrong_audience", id="no-aud"),
        pytest.param({"sub": None}, {}, "missing_subject", id="no-sub"),
        pytest.param({"sub": ""}, {}, "missing_subject", id="empty-sub"),
        pytest.param({}, {"kid": "unknown"}, "unknown_key", id="unknown-kid"),
        pytest.param({}, {"kid": "../../etc/passwd' OR 1=1"}, "unknown_key", id="kid-injection"),
    ],
)
async def test_claim_and_header_checks(
    httpx_mock: HTTPXMock, claims: dict[str, Any], header: dict[str, Any], reason: str
) -> None:
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _validator(http).authenticate([f"Bearer {signer.token(header=header, **claims)}"])
    assert err.value.reason == reason
    assert err.value.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')


async def test_untrusted_issuer_is_refused_without_any_request(httpx_mock: HTTPXMock) -> None:
    signer = Signer(issuer=OTHER_ISSUER)
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _validator(http).authenticate([f"Bearer {signer.token()}"])
    assert err.value.reason == "untrusted_issuer"
    assert httpx_mock.get_requests() == []


async def test_trailing_slash_issuer_is_a_different_issuer(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _validator(http).authenticate([f"Bearer {signer.token(iss=ISSUER + '/')}"])
    assert err.value.reason == "untrusted_issuer"
    assert httpx_mock.get_requests() == []


async def test_alg_none_is_refused_before_fetching_keys(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    unsigned = _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(signer.claims()) + "."
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _validator(http).authenticate([f"Bearer {unsigned}"])
    assert err.value.reason in {"algorithm_not_allowed", "malformed_token"}
    assert httpx_mock.get_requests() == []


async def test_hs256_signed_with_the_public_key_is_refused(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    public_pem = signer.key.as_pem(private=False)
    signing_input = _b64({"alg": "HS256", "kid": signer.kid}) + "." + _b64(signer.claims())
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    token = signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _validator(http).authenticate([f"Bearer {token}"])
    assert err.value.reason == "algorithm_not_allowed"


async def test_jku_x5u_and_jwk_headers_cause_no_request(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    attacker = ECKey.generate_key("P-256", private=True)
    header = {
        "jku": "https://attacker.example/jwks.json",
        "x5u": "https://attacker.example/cert.pem",
        "jwk": attacker.as_dict(private=False),
        "kid": "attacker",
        "alg": "ES256",
    }
    token = jwt.encode(header, signer.claims(), attacker, algorithms=["ES256"])
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _validator(http).authenticate([f"Bearer {token}"])
    assert err.value.reason == "unknown_key"
    assert {str(r.url.host) for r in httpx_mock.get_requests()} == {"idp.example.org"}


async def test_tampered_signature_is_refused(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    head, payload, sig = signer.token().split(".")
    forged_payload = _b64(signer.claims(sub="root"))
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _validator(http).authenticate([f"Bearer {head}.{forged_payload}.{sig}"])
    assert err.value.reason == "bad_signature"


async def test_token_signed_by_another_key_of_the_same_kid_is_refused(httpx_mock: HTTPXMock) -> None:
    signer, impostor = Signer(), Signer()
    _serve_keys(httpx_mock, signer)
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _validator(http).authenticate([f"Bearer {impostor.token()}"])
    assert err.value.reason == "bad_signature"


@pytest.mark.parametrize(
    ("values", "error", "reason"),
    [
        pytest.param([], MissingTokenError, "missing_token", id="no-header"),
        pytest.param(["Bearer"], MissingTokenError, "missing_token", id="empty-bearer"),
        pytest.param(["Basic dXNlcjpwYXNz"], AuthenticationError, "not_bearer", id="basic"),
        pytest.param(["Bearer a.b.c", "Bearer d.e.f"], BadRequestError, "duplicate_authorization", id="two-headers"),
        pytest.param(["Bearer " + "a" * 20000], AuthenticationError, "token_too_large", id="too-large"),
        pytest.param(["Bearer t\u00f6ken"], AuthenticationError, "malformed_token", id="non-ascii"),
        pytest.param(["Bearer a b"], AuthenticationError, "malformed_token", id="space-inside"),
    ],
)
def test_extract_bearer_refusals(values: list[str], error: type[Exception], reason: str) -> None:
    with pytest.raises(error) as err:
        extract_bearer(values, max_bytes=16384)
    assert getattr(err.value, "reason", None) == reason


def test_bearer_scheme_is_case_insensitive() -> None:
    assert extract_bearer(["bEaReR abc.def.ghi"], max_bytes=100) == "abc.def.ghi"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("garbage", id="one-part"),
        pytest.param("a.b.c", id="not-base64-json"),
        pytest.param(
            _b64({"alg": "RS256"}) + "." + base64.urlsafe_b64encode(b"[1]").decode() + ".x", id="payload-list"
        ),
        pytest.param("a.b.c.d.e", id="jwe-shape"),
    ],
)
async def test_malformed_tokens(httpx_mock: HTTPXMock, token: str) -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _validator(http).authenticate([f"Bearer {token}"])
    assert err.value.reason == "malformed_token"
    assert httpx_mock.get_requests() == []


async def test_valid_tokens_are_cached(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    token = signer.token()
    async with httpx.AsyncClient() as http:
        validator = _validator(http)
        first = await validator.authenticate([f"Bearer {token}"])
        second = await validator.authenticate([f"Bearer {token}"])
    assert first is second
    assert len(httpx_mock.get_requests()) == 2  # discovery and keys, once


async def test_provider_down_is_a_503_not_a_401(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_exception(httpx.ConnectError("refused"), is_reusable=True)
    async with httpx.AsyncClient() as http:
        with pytest.raises(DependencyError) as err:
            await _validator(http).authenticate([f"Bearer {Signer().token()}"])
    assert err.value.status_code == 503
    assert err.value.reason == "provider_unreachable"


def test_leeway_applies_to_exp_and_nbf() -> None:
    now = 1_000_000.0
    check_time_claims({"exp": now - 10, "nbf": now + 10}, now, leeway=30)
    with pytest.raises(AuthenticationError):
        check_time_claims({"exp": now - 31}, now, leeway=30)
    with pytest.raises(AuthenticationError):
        check_time_claims({"exp": True}, now, leeway=30)
