from __future__ import annotations

import asyncio
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

from slurmproxy.config.settings import IssuerSettings, OidcSettings
from slurmproxy.errors import AuthenticationError, DependencyError
from slurmproxy.tokens.checks import check_time_claims
from slurmproxy.tokens.provider import ProviderClient
from slurmproxy.tokens.validator import TokenValidator
from tests.helpers import AUDIENCE, ISSUER, JWKS_URI, OTHER_ISSUER, VO_MEMBER, Signer, discovery, serve_keys

OIDC = OidcSettings(http_timeout_seconds=1)

pytestmark = pytest.mark.anyio


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _validator(http: httpx.AsyncClient, **issuer: Any) -> TokenValidator:
    settings = IssuerSettings(issuer=ISSUER, **{"audiences": (AUDIENCE,), **issuer})
    provider = ProviderClient(settings, http, OIDC)
    return TokenValidator({ISSUER: provider}, OIDC, max_token_bytes=16384)


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


class FromNow(int):
    """A time claim given as seconds from when the test runs (parameters are made at collection, which
    can be many minutes before a test runs in a long suite)."""


def at_run_time(claims: dict[str, Any]) -> dict[str, Any]:
    now = int(time.time())
    return {k: now + v if isinstance(v, FromNow) else v for k, v in claims.items()}


@pytest.mark.parametrize(
    ("claims", "header", "reason"),
    [
        pytest.param({"exp": FromNow(-120)}, {}, "token_expired", id="expired"),
        pytest.param({"exp": None}, {}, "missing_exp", id="no-exp"),
        pytest.param({"nbf": FromNow(600)}, {}, "token_not_yet_valid", id="nbf-future"),
        pytest.param({"iat": FromNow(3600)}, {}, "token_issued_in_future", id="iat-future"),
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
            await _validator(http).authenticate([f"Bearer {signer.token(header=header, **at_run_time(claims))}"])
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
    "token",
    [
        pytest.param("garbage", id="one-part"),
        pytest.param("a.b.c", id="not-base64-json"),
        pytest.param(
            _b64({"alg": "RS256"}) + "." + base64.urlsafe_b64encode(b"[1]").decode() + ".x", id="payload-list"
        ),
        pytest.param("a.b.c.d.e", id="jwe-shape"),
        pytest.param("eyJhbGciOiJSUzI1NiJ9.e30.\u00e9", id="non-ascii"),
        pytest.param("eyJhbGciOiJSUzI1NiJ9.e30.a,b", id="comma"),
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


# ---------------------------------------------------------------- claims from userinfo and introspection
USERINFO = f"{ISSUER}/protocol/openid-connect/userinfo"
INTROSPECT = f"{ISSUER}/protocol/openid-connect/token/introspect"
CHECKIN: dict[str, Any] = {
    "token_types": ("Bearer",),
    "entitlements_source": "userinfo",
    "subject_claim": ("voperson_id", "sub"),
    "userinfo_endpoint": USERINFO,
    "introspection_endpoint": INTROSPECT,
    "client_id": "slurmproxy",
    "client_secret_file": "/run/secrets/unused",
}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _checkin_validator(
    http: httpx.AsyncClient, clock: Clock | None = None, jwks_seconds: float = 3600, **overrides: Any
) -> TokenValidator:
    clock = clock or Clock()
    settings = IssuerSettings(issuer=ISSUER, **{**CHECKIN, **overrides})
    oidc = OidcSettings(http_timeout_seconds=1, jwks_cache_seconds=int(jwks_seconds), token_cache_seconds=300)
    provider = ProviderClient(settings, http, oidc, clock=clock)
    return TokenValidator(
        {ISSUER: provider}, oidc, max_token_bytes=16384, clock=clock, client_secrets={ISSUER: "s3cret"}
    )


def _checkin_token(signer: Signer, **claims: Any) -> str:
    """Shaped like a Check-in access token: typ Bearer, no aud, no entitlements."""
    base: dict[str, Any] = {"aud": None, "eduperson_entitlement": None, "typ": "Bearer", "sub": "carol"}
    return signer.token(header={"typ": "JWT"}, **{**base, **claims})


def _userinfo(**extra: Any) -> dict[str, Any]:
    return {"sub": "carol", "voperson_id": "carol@egi.eu", "eduperson_entitlement": [VO_MEMBER], **extra}


def _requests_to(httpx_mock: HTTPXMock, url: str) -> int:
    return sum(1 for r in httpx_mock.get_requests() if str(r.url) == url)


async def test_checkin_token_gets_subject_and_entitlements_from_userinfo(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    httpx_mock.add_response(url=USERINFO, json=_userinfo())
    token = _checkin_token(signer)
    async with httpx.AsyncClient() as http:
        principal = await _checkin_validator(http).authenticate([f"Bearer {token}"])
    assert principal.subject == "carol@egi.eu"
    assert principal.entitlements == (VO_MEMBER,)
    assert principal.claims["sub"] == "carol" and "eduperson_entitlement" not in principal.claims
    assert principal.userinfo is not None and principal.userinfo["voperson_id"] == "carol@egi.eu"
    request = httpx_mock.get_request(url=USERINFO)
    assert request is not None and request.headers["authorization"] == f"Bearer {token}"


async def test_200_concurrent_first_requests_make_one_userinfo_call(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    calls = 0

    async def slow_userinfo(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)  # every request arrives while this one is in flight
        return httpx.Response(200, json=_userinfo())

    httpx_mock.add_callback(slow_userinfo, url=USERINFO, is_reusable=True)
    header = [f"Bearer {_checkin_token(signer)}"]
    async with httpx.AsyncClient() as http:
        validator = _checkin_validator(http)
        principals = await asyncio.gather(*(validator.authenticate(header) for _ in range(200)))
        again = await validator.authenticate(header)
    assert calls == 1
    assert {id(p) for p in principals} == {id(again)}


async def test_distinct_tokens_are_distinct_calls(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    httpx_mock.add_response(url=USERINFO, json=_userinfo(), is_reusable=True)
    async with httpx.AsyncClient() as http:
        validator = _checkin_validator(http)
        for n in range(3):
            await validator.authenticate([f"Bearer {_checkin_token(signer, jti=str(n))}"])
    assert _requests_to(httpx_mock, USERINFO) == 3


async def test_withdrawn_entitlement_is_seen_when_the_cache_entry_expires(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    httpx_mock.add_response(url=USERINFO, json=_userinfo())
    httpx_mock.add_response(url=USERINFO, json=_userinfo(eduperson_entitlement=[]))
    clock = Clock()
    header = [f"Bearer {_checkin_token(signer, exp=int(clock.now) + 3600)}"]
    async with httpx.AsyncClient() as http:
        validator = _checkin_validator(http, clock)
        assert (await validator.authenticate(header)).entitlements == (VO_MEMBER,)
        clock.now += 299
        assert (await validator.authenticate(header)).entitlements == (VO_MEMBER,)
        clock.now += 1  # token_cache_seconds (300) reached
        assert (await validator.authenticate(header)).entitlements == ()
    assert _requests_to(httpx_mock, USERINFO) == 2


async def test_a_cached_token_is_never_used_past_its_exp(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    httpx_mock.add_response(url=USERINFO, json=_userinfo())
    clock = Clock()
    header = [f"Bearer {_checkin_token(signer, exp=int(clock.now) + 60)}"]
    async with httpx.AsyncClient() as http:
        validator = _checkin_validator(http, clock)
        await validator.authenticate(header)
        clock.now += 60 + 30  # exp plus the leeway, well before the 300 s cache maximum
        with pytest.raises(AuthenticationError) as err:
            await validator.authenticate(header)
    assert err.value.reason == "token_expired"
    assert _requests_to(httpx_mock, USERINFO) == 1


async def test_refused_tokens_are_remembered_briefly(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    httpx_mock.add_response(url=USERINFO, status_code=401, is_reusable=True)
    clock = Clock()
    header = [f"Bearer {_checkin_token(signer)}"]
    async with httpx.AsyncClient() as http:
        validator = _checkin_validator(http, clock)
        for _ in range(3):
            with pytest.raises(AuthenticationError) as err:
                await validator.authenticate(header)
            assert err.value.reason == "userinfo_rejected"
        assert _requests_to(httpx_mock, USERINFO) == 1
        clock.now += 5
        with pytest.raises(AuthenticationError):
            await validator.authenticate(header)
    assert _requests_to(httpx_mock, USERINFO) == 2


async def test_outage_cached_tokens_keep_working_new_ones_get_503(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    httpx_mock.add_response(url=USERINFO, json=_userinfo())
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=USERINFO, is_reusable=True)
    known, new = _checkin_token(signer, jti="known"), _checkin_token(signer, jti="new")
    async with httpx.AsyncClient() as http:
        validator = _checkin_validator(http)
        await validator.authenticate([f"Bearer {known}"])
        assert (await validator.authenticate([f"Bearer {known}"])).subject == "carol@egi.eu"
        with pytest.raises(DependencyError) as err:
            await validator.authenticate([f"Bearer {new}"])
    assert err.value.status_code == 503 and err.value.reason == "provider_unreachable"


async def test_forged_or_foreign_tokens_never_reach_userinfo(httpx_mock: HTTPXMock) -> None:
    signer, impostor = Signer(), Signer()
    _serve_keys(httpx_mock, signer)
    cases = {
        "bad_signature": _checkin_token(impostor),
        "wrong_token_type": _checkin_token(signer, typ="ID"),
        "token_expired": _checkin_token(signer, exp=int(time.time()) - 600),
        "untrusted_issuer": _checkin_token(Signer(issuer=OTHER_ISSUER)),
    }
    async with httpx.AsyncClient() as http:
        validator = _checkin_validator(http)
        for reason, token in cases.items():
            with pytest.raises(AuthenticationError) as err:
                await validator.authenticate([f"Bearer {token}"])
            assert err.value.reason == reason
    assert _requests_to(httpx_mock, USERINFO) == 0


async def test_jwt_entitlements_from_introspection_and_revocation(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    httpx_mock.add_response(url=INTROSPECT, json={"active": True, "sub": "carol", "eduperson_entitlement": [VO_MEMBER]})
    httpx_mock.add_response(url=INTROSPECT, json={"active": False})
    async with httpx.AsyncClient() as http:
        validator = _checkin_validator(http, entitlements_source="introspection", subject_source="token")
        principal = await validator.authenticate([f"Bearer {_checkin_token(signer, jti='1')}"])
        assert principal.subject == "carol" and principal.entitlements == (VO_MEMBER,)
        with pytest.raises(AuthenticationError) as err:
            await validator.authenticate([f"Bearer {_checkin_token(signer, jti='2')}"])
    assert err.value.reason == "token_inactive"
    assert _requests_to(httpx_mock, USERINFO) == 0


async def test_key_dropped_by_the_provider_ends_cached_tokens(httpx_mock: HTTPXMock) -> None:
    signer = Signer()
    httpx_mock.add_response(url=f"{ISSUER}/.well-known/openid-configuration", json=discovery())
    httpx_mock.add_response(url=JWKS_URI, json=signer.jwks())
    httpx_mock.add_response(url=JWKS_URI, json={"keys": []})
    httpx_mock.add_response(url=USERINFO, json=_userinfo())
    clock = Clock()
    header = [f"Bearer {_checkin_token(signer, exp=int(clock.now) + 7200)}"]
    async with httpx.AsyncClient() as http:
        validator = _checkin_validator(http, clock, jwks_seconds=60)
        await validator.authenticate(header)
        clock.now += 100  # the key set (60 s) is due for a refresh, the cached token (300 s) is not
        assert (await validator.authenticate(header)).subject == "carol@egi.eu"  # answered from the cache
        await validator.providers[ISSUER].settle()  # meanwhile the background refresh saw the key gone
        with pytest.raises(AuthenticationError) as err:
            await validator.authenticate(header)
    assert err.value.reason == "unknown_key"
    assert _requests_to(httpx_mock, USERINFO) == 1


OPAQUE = "Zk9xT2JqZWN0LW9wYXF1ZS10b2tlbi12YWx1ZQ"
OPAQUE_ISSUER = "https://opaque.example.org"
OPAQUE_INTROSPECT = f"{OPAQUE_ISSUER}/introspect"


def _active(**extra: Any) -> dict[str, Any]:
    """An introspection answer for an active token, its times as of now."""
    return at_run_time(_answer(**extra))


def _answer(**extra: Any) -> dict[str, Any]:
    """The same with its times relative (for parameters: resolved when the test runs)."""
    return {
        "active": True,
        "iss": OPAQUE_ISSUER,
        "sub": "alice",
        "token_type": "Bearer",
        "exp": FromNow(600),
        "eduperson_entitlement": [VO_MEMBER],
        **extra,
    }


def _two_issuers(http: httpx.AsyncClient, clock: Clock | None = None, **opaque: Any) -> TokenValidator:
    """A JWT issuer with userinfo, and another that alone accepts opaque tokens."""
    clock = clock or Clock()
    jwt_issuer = IssuerSettings(issuer=ISSUER, **CHECKIN)
    opaque_issuer = IssuerSettings(
        issuer=OPAQUE_ISSUER,
        accept_opaque_tokens=True,
        entitlements_source="introspection",
        introspection_endpoint=OPAQUE_INTROSPECT,
        client_id="slurmproxy",
        client_secret_file="/run/secrets/unused",
        **opaque,
    )
    providers = {s.issuer: ProviderClient(s, http, OIDC, clock=clock) for s in (jwt_issuer, opaque_issuer)}
    secrets = {ISSUER: "s1", OPAQUE_ISSUER: "s2"}
    return TokenValidator(providers, OIDC, max_token_bytes=16384, clock=clock, client_secrets=secrets)


async def test_opaque_token_is_validated_by_introspection_at_its_one_issuer(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=OPAQUE_INTROSPECT, method="POST", json=_active())
    clock = Clock()
    async with httpx.AsyncClient() as http:
        validator = _two_issuers(http, clock)
        principal = await validator.authenticate([f"Bearer {OPAQUE}"])
        assert await validator.authenticate([f"Bearer {OPAQUE}"]) is principal
    assert principal.issuer == OPAQUE_ISSUER and principal.subject == "alice"
    assert principal.entitlements == (VO_MEMBER,)
    assert principal.introspection is not None and principal.userinfo is None
    assert [str(r.url) for r in httpx_mock.get_requests()] == [OPAQUE_INTROSPECT]  # never to the other issuer


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        pytest.param({"active": False}, "token_inactive", id="revoked"),
        pytest.param(_answer(token_type=None), "wrong_token_type", id="refresh-token"),
        pytest.param(_answer(exp=FromNow(-600)), "token_expired", id="expired"),
        pytest.param(_answer(iss=ISSUER), "untrusted_issuer", id="other-issuer"),
        pytest.param(_answer(cnf={"jkt": "x"}), "wrong_token_type", id="dpop-bound"),
        pytest.param(_answer(sub=None), "missing_subject", id="no-subject"),
    ],
)
async def test_opaque_token_refusals(httpx_mock: HTTPXMock, answer: dict[str, Any], reason: str) -> None:
    answer = at_run_time(answer)
    httpx_mock.add_response(url=OPAQUE_INTROSPECT, json={k: v for k, v in answer.items() if v is not None})
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _two_issuers(http).authenticate([f"Bearer {OPAQUE}"])
    assert err.value.reason == reason


async def test_opaque_token_audience_is_checked_when_configured(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=OPAQUE_INTROSPECT, json=_active(aud="someone-else"))
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _two_issuers(http, audiences=(AUDIENCE,)).authenticate([f"Bearer {OPAQUE}"])
    assert err.value.reason == "wrong_audience"


async def test_opaque_token_cache_follows_the_introspected_exp(httpx_mock: HTTPXMock) -> None:
    clock = Clock()
    httpx_mock.add_response(url=OPAQUE_INTROSPECT, json=_active(exp=int(clock.now) + 40), is_reusable=True)
    async with httpx.AsyncClient() as http:
        validator = _two_issuers(http, clock)
        await validator.authenticate([f"Bearer {OPAQUE}"])
        clock.now += 69  # exp + 30 s leeway not reached
        await validator.authenticate([f"Bearer {OPAQUE}"])
        assert len(httpx_mock.get_requests()) == 1
        clock.now += 2
        with pytest.raises(AuthenticationError) as err:
            await validator.authenticate([f"Bearer {OPAQUE}"])
    assert err.value.reason == "token_expired"
    assert len(httpx_mock.get_requests()) == 2


async def test_opaque_token_without_an_opaque_issuer_is_refused_without_io(httpx_mock: HTTPXMock) -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _checkin_validator(http).authenticate([f"Bearer {OPAQUE}"])
    assert err.value.reason == "malformed_token"
    assert httpx_mock.get_requests() == []


async def test_jwt_from_an_unknown_issuer_is_never_introspected(httpx_mock: HTTPXMock) -> None:
    token = Signer(issuer="https://evil.example.org").token()
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _two_issuers(http).authenticate([f"Bearer {token}"])
    assert err.value.reason == "untrusted_issuer"
    assert httpx_mock.get_requests() == []


# --- issue 15, item 12 --------------------------------------------------------------------------


async def test_a_jwt_without_sub_is_refused_before_any_provider_call(httpx_mock: HTTPXMock) -> None:
    """RFC 9068 §2.2: a JWT access token has `sub`. Without it, no userinfo call (whose failure would be a
    503), however the issuer's subject is read."""
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _checkin_validator(http).authenticate([f"Bearer {_checkin_token(signer, sub=None)}"])
    assert err.value.reason == "missing_subject" and err.value.status_code == 401
    assert _requests_to(httpx_mock, USERINFO) == 0


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        pytest.param({"exp": float("inf")}, "missing_exp", id="exp-infinity"),
        pytest.param({"exp": float("nan")}, "missing_exp", id="exp-nan"),
        pytest.param({"nbf": float("nan")}, "token_not_yet_valid", id="nbf-nan"),
        pytest.param({"nbf": float("-inf")}, "token_not_yet_valid", id="nbf-minus-infinity"),
        pytest.param({"iat": float("nan")}, "token_issued_in_future", id="iat-nan"),
        pytest.param({"iat": float("-inf")}, "token_issued_in_future", id="iat-minus-infinity"),
    ],
)
async def test_non_finite_time_claims_are_refused(httpx_mock: HTTPXMock, claims: dict[str, Any], reason: str) -> None:
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    token = signer.token(**claims)
    assert "NaN" in token_payload(token) or "Infinity" in token_payload(token)
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _validator(http).authenticate([f"Bearer {token}"])
    assert err.value.reason == reason


def token_payload(token: str) -> str:
    segment = token.split(".")[1]
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)).decode()


# --- issue 15, item 6: tokens meant for other services -----------------------------------------


@pytest.mark.parametrize(
    ("claims", "accepted"),
    [
        pytest.param({"azp": "slurm-portal"}, True, id="azp-listed"),
        pytest.param({"client_id": "interlink"}, True, id="client-id-listed"),
        pytest.param({"azp": "slurm-portal", "client_id": "slurm-portal"}, True, id="both-agree"),
        pytest.param({"azp": "some-other-rp"}, False, id="another-relying-party"),
        pytest.param({"azp": "slurm-portal", "client_id": "some-other-rp"}, False, id="both-disagree"),
        pytest.param({}, False, id="no-client-claim"),
        pytest.param({"azp": ["slurm-portal"]}, False, id="not-a-string"),
    ],
)
async def test_an_issuers_client_allow_list(httpx_mock: HTTPXMock, claims: dict[str, Any], accepted: bool) -> None:
    """A Check-in token carries no `aud`: any relying party holding a user's token could replay it here,
    unless the proxy accepts only the clients (`azp`/`client_id`) that are meant to call it."""
    signer = Signer()
    _serve_keys(httpx_mock, signer)
    token = signer.token(aud=None, **claims)
    async with httpx.AsyncClient() as http:
        validator = _validator(http, audiences=(), clients=("slurm-portal", "interlink"))
        if accepted:
            assert (await validator.authenticate([f"Bearer {token}"])).subject == "alice@example.org"
            return
        with pytest.raises(AuthenticationError) as err:
            await validator.authenticate([f"Bearer {token}"])
    assert err.value.reason == "wrong_client" and err.value.status_code == 401


async def test_an_opaque_tokens_client_is_the_introspection_answers(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=OPAQUE_INTROSPECT, json=_active(client_id="some-other-rp"))
    async with httpx.AsyncClient() as http:
        with pytest.raises(AuthenticationError) as err:
            await _two_issuers(http, clients=("slurm-portal",)).authenticate([f"Bearer {OPAQUE}"])
    assert err.value.reason == "wrong_client"


@pytest.mark.parametrize(
    ("typ", "accepted"),
    [
        pytest.param("at+jwt", True, id="at+jwt"),
        pytest.param("application/at+JWT", True, id="media-type-form"),
        pytest.param("JWT", False, id="plain-jwt"),
        pytest.param(None, False, id="no-typ"),
    ],
)
async def test_require_at_jwt_checks_the_jose_header(httpx_mock: HTTPXMock, typ: str | None, accepted: bool) -> None:
    """RFC 9068 §4: an issuer that types its access tokens `at+jwt` lets the proxy refuse its ID tokens."""
    signer = serve_keys(httpx_mock, Signer())
    token = signer.token(header={"typ": typ})
    async with httpx.AsyncClient() as http:
        validator = _validator(http, require_at_jwt=True)
        if accepted:
            await validator.authenticate([f"Bearer {token}"])
            return
        with pytest.raises(AuthenticationError) as err:
            await validator.authenticate([f"Bearer {token}"])
    assert err.value.reason == "wrong_token_type"
    assert [r for r in httpx_mock.get_requests() if str(r.url) == JWKS_URI] == []  # refused before any key fetch
