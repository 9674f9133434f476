"""The token attack corpus, against the real server, the real provider and real Slurm (both generations).

Every case is refused with the check that failed (401, or 400 for a malformed request), has its
audit record, never echoes the token, makes no request to a URL or host the token names, and never
reaches slurmrestd (checked in slurmrestd's own log).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from devstack import SlurmCluster
from devstack.provider import OidcProvider
from devstack.proxy import ProxyServer
from tests.integration.conftest import call, records_for
from tests.integration.hostile import Canary, Forger, RestdLog, http_bytes, raw_request

TEN_YEARS = 10 * 365 * 86400


@dataclass
class Kit:
    forger: Forger
    canary: Canary
    slurm: SlurmCluster


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    with Canary() as listener:
        yield listener


@pytest.fixture
def kit(oidc: OidcProvider, canary: Canary, slurm: SlurmCluster) -> Kit:
    return Kit(Forger(oidc), canary, slurm)


def _jwk_header(kit: Kit, kid: str | None) -> dict[str, Any]:
    return {"jwk": kit.forger.embeddable_jwk("attacker-small"), "kid": kid}


def later(seconds: int) -> int:
    return int(time.time()) + seconds


Case = tuple[str, Callable[[Kit], str], str]

TOKEN_CASES: list[Case] = [
    ("alg-none", lambda k: k.forger.unsigned("none"), "algorithm_not_allowed"),
    ("alg-None", lambda k: k.forger.unsigned("None"), "algorithm_not_allowed"),
    ("alg-NONE", lambda k: k.forger.unsigned("NONE"), "algorithm_not_allowed"),
    ("hs256-keyed-with-public-pem", lambda k: k.forger.hmac_with_public_key("pem"), "algorithm_not_allowed"),
    ("hs256-keyed-with-public-jwk", lambda k: k.forger.hmac_with_public_key("jwk"), "algorithm_not_allowed"),
    ("rs512-not-on-allow-list", lambda k: k.forger.signed({"alg": "RS512"}), "algorithm_not_allowed"),
    ("unknown-kid", lambda k: k.forger.signed(attacker=True), "unknown_key"),
    ("kid-path-traversal", lambda k: k.forger.signed({"kid": "../../../../etc/passwd"}), "unknown_key"),
    ("kid-sql", lambda k: k.forger.signed({"kid": "' OR '1'='1' --"}), "unknown_key"),
    ("kid-nul-and-newline", lambda k: k.forger.signed({"kid": "x\u0000\r\ny"}), "unknown_key"),
    ("kid-url-of-canary", lambda k: k.forger.signed({"kid": k.canary.url + "/key"}), "unknown_key"),
    ("kid-not-a-string", lambda k: k.forger.signed({"kid": 7}), "malformed_token"),
    ("jku-to-canary", lambda k: k.forger.signed({"jku": k.canary.url + "/jwks"}, attacker=True), "unknown_key"),
    ("x5u-to-canary", lambda k: k.forger.signed({"x5u": k.canary.url + "/cert"}, attacker=True), "unknown_key"),
    ("jwk-embedded", lambda k: k.forger.signed(_jwk_header(k, "attacker-small"), small=True), "unknown_key"),
    (
        "jwk-embedded-with-the-real-kid",
        lambda k: k.forger.signed(_jwk_header(k, k.forger.provider_key.kid), small=True),
        "bad_signature",
    ),
    ("expired", lambda k: k.forger.signed(exp=later(-3600), iat=later(-7200)), "token_expired"),
    ("exp-missing", lambda k: k.forger.signed(exp=None), "missing_exp"),
    ("exp-a-string", lambda k: k.forger.signed(exp="2999-01-01"), "missing_exp"),
    ("nbf-in-the-future", lambda k: k.forger.signed(nbf=later(3600)), "token_not_yet_valid"),
    ("iat-far-in-the-future", lambda k: k.forger.signed(iat=later(TEN_YEARS)), "token_issued_in_future"),
    ("wrong-iss", lambda k: k.forger.signed(iss="https://aai.egi.eu/auth/realms/egi"), "untrusted_issuer"),
    ("iss-of-an-unconfigured-host", lambda k: k.forger.signed(iss=k.canary.url), "untrusted_issuer"),
    ("iss-with-trailing-slash", lambda k: k.forger.signed(iss=k.forger.oidc.issuer + "/"), "untrusted_issuer"),
    ("iss-missing", lambda k: k.forger.signed(iss=None), "untrusted_issuer"),
    ("wrong-aud", lambda k: k.forger.signed(aud="another-service"), "wrong_audience"),
    ("aud-list-without-ours", lambda k: k.forger.signed(aud=["a", "b"]), "wrong_audience"),
    ("aud-missing", lambda k: k.forger.signed(aud=None), "wrong_audience"),
    ("no-sub", lambda k: k.forger.signed(sub=None), "missing_subject"),
    ("empty-sub", lambda k: k.forger.signed(sub=""), "missing_subject"),
    ("sub-not-a-string", lambda k: k.forger.signed(sub=2001), "missing_subject"),
    ("signature-of-another-payload", lambda k: _swap_payload(k), "bad_signature"),
    ("over-16-kb", lambda k: k.forger.signed(padding="x" * 17_000), "token_too_large"),
    ("garbage", lambda k: "garbage", "malformed_token"),
    ("garbage-three-parts", lambda k: "a.b.c", "malformed_token"),
    ("header-not-an-object", lambda k: "WzFd.e30.c2ln", "malformed_token"),
    ("two-parts", lambda k: "eyJhbGciOiJSUzI1NiJ9.e30", "malformed_token"),
    ("jwe-five-parts", lambda k: "a.b.c.d.e", "malformed_token"),
    ("slurm-jwt-for-root", lambda k: k.slurm.mint_token("root"), "untrusted_issuer"),
]


def _swap_payload(kit: Kit) -> str:
    head, _, sig = kit.forger.signed().split(".")
    _, payload, _ = kit.forger.signed(sub="root").split(".")
    return f"{head}.{payload}.{sig}"


def assert_refused(
    proxy: ProxyServer, response: httpx.Response, request_id: str, status: int, reason: str, token: str | None
) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["slurmproxy"]["reason"] == reason, body
    assert body["errors"][0]["source"] == "slurmproxy"
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
    if token:
        assert token not in response.text and token not in json.dumps(dict(response.headers))
    (record,) = records_for(proxy, request_id)
    assert record["decision"] == "deny" and record["reason"] == reason and record["status"] == status
    assert record["upstream_status"] is None and record["local_user"] is None
    if token:
        assert token not in json.dumps(record)


@pytest.mark.parametrize(("build", "reason"), [pytest.param(b, r, id=i) for i, b, r in TOKEN_CASES])
def test_token_attack_is_refused_without_outbound_request(
    proxy: ProxyServer,
    oidc: OidcProvider,
    slurm: SlurmCluster,
    kit: Kit,
    api: str,
    request_id: str,
    build: Callable[[Kit], str],
    reason: str,
) -> None:
    token = build(kit)
    restd = RestdLog(slurm)
    mark = restd.mark()
    jwks_before = oidc.stats()["jwks"]
    hits_before = kit.canary.connections

    response = call(proxy, "GET", f"{api}/jobs", token=token, request_id=request_id)

    assert_refused(proxy, response, request_id, 401, reason, token)
    assert kit.canary.connections == hits_before, "the proxy contacted a URL or host named by the token"
    assert oidc.stats()["jwks"] - jwks_before <= 1  # at most the rate-limited refetch for an unknown kid
    assert restd.since(mark) == []


def test_unknown_kids_refetch_the_key_set_at_most_once(
    proxy: ProxyServer, oidc: OidcProvider, kit: Kit, api: str, request_id: str
) -> None:
    before = oidc.stats()["jwks"]
    for n in range(20):
        token = kit.forger.signed({"kid": f"random-{n}"}, attacker=True)
        response = call(proxy, "GET", f"{api}/jobs", token=token, request_id=f"{request_id}-{n}")
        assert response.json()["slurmproxy"]["reason"] == "unknown_key"
    assert oidc.stats()["jwks"] - before <= 1


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        pytest.param(b"Bearer t\xc3\xb6k\xc3\xa9n", "malformed_token", id="utf8"),
        pytest.param(b"Bearer t\xf6k\xe9n", "malformed_token", id="latin1"),
        pytest.param(b"Bearer \xff\xfe\xfd", "malformed_token", id="binary"),
        pytest.param(b"Bearer a b", "malformed_token", id="space-inside"),
        pytest.param(b"Bearer", "missing_token", id="scheme-only"),
        pytest.param(b"Basic YWxpY2U6cGFzc3dvcmQ=", "not_bearer", id="basic"),
        pytest.param(b"Negotiate abc", "not_bearer", id="negotiate"),
    ],
)
def test_non_ascii_and_odd_authorization_headers(
    proxy: ProxyServer, slurm: SlurmCluster, api: str, request_id: str, header: bytes, reason: str
) -> None:
    restd = RestdLog(slurm)
    mark = restd.mark()
    data = http_bytes("GET", f"{api}/jobs", [("X-Request-ID", request_id)])
    data = data.replace(b"\r\n\r\n", b"\r\nAuthorization: " + header + b"\r\n\r\n")
    answer = raw_request(proxy, data)
    assert answer.status == 401 and answer.reason == reason
    assert [r["reason"] for r in records_for(proxy, request_id)] == [reason]
    assert restd.since(mark) == []


def test_two_authorization_headers_are_refused(
    proxy: ProxyServer, oidc: OidcProvider, slurm: SlurmCluster, api: str, request_id: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    restd = RestdLog(slurm)
    mark = restd.mark()
    headers = [("Authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}"), ("X-Request-ID", request_id)]
    response = httpx.get(proxy.url + f"{api}/jobs", headers=headers, timeout=60)
    assert_refused(proxy, response, request_id, 400, "duplicate_authorization", token)
    assert restd.since(mark) == []


@pytest.mark.parametrize("query", ["access_token={token}", "jobs=1&access_token={token}", "ACCESS%5FTOKEN={token}"])
@pytest.mark.parametrize("with_header", [False, True], ids=["query-only", "query-and-header"])
def test_a_token_in_the_query_string_is_never_accepted(
    proxy: ProxyServer,
    oidc: OidcProvider,
    slurm: SlurmCluster,
    api: str,
    request_id: str,
    query: str,
    with_header: bool,
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    restd = RestdLog(slurm)
    mark = restd.mark()
    url = f"{api}/jobs?" + query.format(token=token)
    response = call(proxy, "GET", url, token=token if with_header else None, request_id=request_id)
    assert_refused(proxy, response, request_id, 400, "token_in_query", token)
    assert restd.since(mark) == []
    assert token not in proxy.log_path.read_text()


def test_the_valid_token_control_reaches_slurmrestd(
    proxy: ProxyServer, kit: Kit, slurm: SlurmCluster, api: str, request_id: str
) -> None:
    """The corpus's control: the same checks pass a token that is good, so a refusal above means something."""
    restd = RestdLog(slurm)
    mark = restd.mark()
    response = call(proxy, "GET", f"{api}/jobs", token=kit.forger.signed(), request_id=request_id)
    assert response.status_code == 200, response.text
    assert [path.rstrip("/") for _, path in restd.since(mark)] == [f"{api}/jobs"]
    assert records_for(proxy, request_id)[0]["decision"] == "allow"
