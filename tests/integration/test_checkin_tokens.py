"""Issue 3, end to end: Check-in-shaped tokens (entitlements only at userinfo and introspection),
opaque tokens, key rotation and provider outages, against the real provider, the proxy as a real
server, and real Slurm (both generations).

Each test that changes the provider (rotation, stop/start, pause) has a provider of its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import SlurmCluster
from devstack.provider import MEMBER_ENTITLEMENT, PROXY_CLIENT, OidcProvider, default_config
from devstack.proxy import ProxyServer
from tests.integration.conftest import ProxyFactory, call, ping_up, proxy_config
from tests.integration.test_end_to_end import submit, the_record

NO_ENTITLEMENT_SCOPE = "openid profile email voperson_id"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def kid_of(token: str) -> str:
    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


def checkin_issuer(provider: OidcProvider, secret_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The one-line Check-in preset, pointed at the test provider, with the proxy's introspection client."""
    secret = secret_dir / f"client-secret-{provider.port}"
    secret.write_text(provider.client_secret(PROXY_CLIENT) + "\n")
    secret.chmod(0o600)
    return {
        "preset": "egi-checkin",
        "issuer": provider.issuer,
        "client_id": PROXY_CLIENT,
        "client_secret_file": str(secret),
        "accept_opaque_tokens": True,
        **overrides,
    }


def checkin_policy(issuer: str, *subjects: tuple[str, str]) -> dict[str, Any]:
    return {
        "rules": [
            {
                "id": "example-members",
                "entitlements": [MEMBER_ENTITLEMENT],
                "allow": ["ping", "read-only", "submit", "cancel-own"],
                "mapping": [{"table": "users"}, {"service_account": "svc-alpha"}],
            }
        ],
        "tables": {"users": {"entries": [{"issuer": issuer, "subject": s, "user": u} for s, u in subjects]}},
    }


CHECKIN_USERS = (("carol@egi.eu", "carol"), ("alice@egi.eu", "alice"))


def start_proxy(
    factory: ProxyFactory,
    slurm: SlurmCluster,
    issuer: dict[str, Any],
    subjects: tuple[tuple[str, str], ...],
    **oidc: Any,
) -> ProxyServer:
    settings = {"http_timeout_seconds": 2, "failure_cache_seconds": 1, **oidc}
    config = proxy_config(slurm, [issuer], oidc=settings)
    return factory(config, {"site.yaml": checkin_policy(issuer["issuer"], *subjects)})


def own_provider(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[OidcProvider]:
    with OidcProvider(tmp_path_factory.mktemp(name), default_config()) as provider:
        yield provider


def reason(response: httpx.Response) -> str:
    return str(response.json()["slurmproxy"]["reason"])


@pytest.fixture(scope="module")
def checkin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    yield from own_provider(tmp_path_factory, "oidc-checkin")


@pytest.fixture(scope="module")
def checkin_proxy(
    slurm: SlurmCluster, checkin: OidcProvider, proxy_factory: ProxyFactory, tmp_path_factory: pytest.TempPathFactory
) -> ProxyServer:
    """Check-in preset: subject (voperson_id) and entitlements from userinfo; opaque tokens introspected."""
    issuer = checkin_issuer(checkin, tmp_path_factory.mktemp("secrets"))
    return start_proxy(proxy_factory, slurm, issuer, CHECKIN_USERS, jwks_min_refetch_seconds=2)


def test_member_whose_entitlement_is_only_at_userinfo_runs_a_job(
    checkin_proxy: ProxyServer, slurm: SlurmCluster, checkin: OidcProvider, api: str, request_id: str
) -> None:
    token = checkin.login("carol")
    claims = claims_of(token)
    assert "eduperson_entitlement" not in claims and "entitlements" not in claims and "aud" not in claims
    assert claims["typ"] == "Bearer" and claims["sub"] == "carol"

    job_id = submit(checkin_proxy, slurm, api, token, request_id, user="carol")
    job = slurm.wait_job(job_id)
    assert job["JobState"] == "COMPLETED" and job["UserId"] == "carol(2003)"
    assert (slurm.job_dir("carol") / f"out-{job_id}.txt").read_text().startswith("uid=2003(carol)")

    record = the_record(checkin_proxy, request_id)
    assert record["decision"] == "allow" and record["issuer"] == checkin.issuer
    assert record["subject"] == "carol@egi.eu"  # voperson_id, from userinfo
    assert record["entitlement"] == MEMBER_ENTITLEMENT
    assert record["local_user"] == "carol" and record["mapping"] == "table:users"
    assert token not in json.dumps(checkin_proxy.audit_records())


@pytest.mark.parametrize(
    ("user", "scope"),
    [
        pytest.param("dave", None, id="not-a-member"),
        pytest.param("carol", NO_ENTITLEMENT_SCOPE, id="member-but-scope-withholds-entitlements"),
    ],
)
def test_userinfo_without_the_entitlement_is_403(
    checkin_proxy: ProxyServer,
    slurm: SlurmCluster,
    checkin: OidcProvider,
    api: str,
    request_id: str,
    user: str,
    scope: str | None,
) -> None:
    token = checkin.login(user, scope) if scope else checkin.login(user)
    assert checkin.userinfo(token).status_code == 200  # a valid token, just no entitlement
    before = {j["JobId"] for j in slurm.jobs()}
    response = call(checkin_proxy, "POST", f"{api}/job/submit", token=token, request_id=request_id, json={})
    assert response.status_code == 403, response.text
    assert reason(response) == "no_rule_matches"
    assert {j["JobId"] for j in slurm.jobs()} == before
    record = the_record(checkin_proxy, request_id)
    assert record["decision"] == "deny" and record["subject"] == f"{user}@egi.eu" and record["upstream_status"] is None


def test_opaque_token_is_validated_by_introspection_and_a_revoked_one_is_401(
    checkin_proxy: ProxyServer, checkin: OidcProvider, api: str, request_id: str
) -> None:
    token = checkin.opaque_token("alice")
    assert token.count(".") != 2  # not a JWT
    checkin.reset_stats()
    response = call(checkin_proxy, "GET", f"{api}/jobs", token=token, request_id=request_id)
    assert response.status_code == 200, response.text
    assert checkin.stats()["introspection"] == 1
    record = the_record(checkin_proxy, request_id)
    assert record["subject"] == "alice@egi.eu" and record["local_user"] == "alice"

    revoked = checkin.opaque_token("alice")
    checkin.revoke(revoked)
    response = call(checkin_proxy, "GET", f"{api}/jobs", token=revoked, request_id=f"{request_id}-revoked")
    assert response.status_code == 401, response.text
    assert reason(response) == "token_inactive"
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert the_record(checkin_proxy, f"{request_id}-revoked")["decision"] == "deny"


async def _burst(url: str, tokens: list[str], concurrency: int) -> list[httpx.Response]:
    """GET ``url`` once per token, ``concurrency`` requests at a time."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def one(bearer: str) -> httpx.Response:
            async with gate:
                return await client.get(url, headers={"Authorization": f"Bearer {bearer}"})

        return await asyncio.gather(*(one(t) for t in tokens))


def test_200_concurrent_requests_with_a_new_token_make_one_userinfo_call(
    checkin_proxy: ProxyServer, checkin: OidcProvider, api: str
) -> None:
    token = checkin.login("carol")
    checkin.reset_stats()
    responses = asyncio.run(_burst(f"{checkin_proxy.url}{api}/ping", [token] * 200, 200))
    assert [r.status_code for r in responses] == [200] * 200, {r.text for r in responses if r.status_code != 200}
    assert ping_up(responses[0].json())
    stats = checkin.stats()
    assert stats["userinfo"] == 1, stats
    assert stats["introspection"] == 0 and stats["jwks"] == 0 and stats["discovery"] == 0, stats


def test_1000_random_kids_cause_at_most_one_key_fetch_per_interval(
    checkin_proxy: ProxyServer, checkin: OidcProvider, api: str
) -> None:
    interval = 2.0  # the proxy's jwks_min_refetch_seconds
    now = int(time.time())
    payload = _b64(json.dumps({"iss": checkin.issuer, "sub": "mallory", "typ": "Bearer", "exp": now + 600}).encode())
    tokens = [
        f"{_b64(json.dumps({'alg': 'RS256', 'typ': 'JWT', 'kid': secrets.token_hex(8)}).encode())}.{payload}."
        + _b64(secrets.token_bytes(256))
        for _ in range(1000)
    ]
    time.sleep(interval + 0.2)  # precondition: the proxy may refetch now, so the flood does trigger one fetch
    checkin.reset_stats()
    started = time.monotonic()
    responses = asyncio.run(_burst(f"{checkin_proxy.url}{api}/ping", tokens, 50))
    elapsed = time.monotonic() - started
    assert {r.status_code for r in responses} == {401}
    assert {reason(r) for r in responses} == {"unknown_key"}
    stats = checkin.stats()
    assert 1 <= stats["jwks"] <= 1 + int(elapsed // interval), (stats, elapsed)
    assert stats["userinfo"] == 0 and stats["introspection"] == 0 and stats["discovery"] == 0


def test_entitlements_from_introspection_subject_from_the_token(
    slurm: SlurmCluster,
    checkin: OidcProvider,
    proxy_factory: ProxyFactory,
    tmp_path_factory: pytest.TempPathFactory,
    api: str,
    request_id: str,
) -> None:
    issuer = checkin_issuer(
        checkin,
        tmp_path_factory.mktemp("secrets"),
        subject_source="token",
        subject_claim="sub",
        entitlements_source="introspection",
        accept_opaque_tokens=False,
    )
    proxy = start_proxy(proxy_factory, slurm, issuer, (("carol", "carol"),))
    token = checkin.login("carol")
    checkin.reset_stats()
    response = call(proxy, "GET", f"{api}/jobs", token=token, request_id=request_id)
    assert response.status_code == 200, response.text
    assert checkin.stats()["introspection"] == 1 and checkin.stats()["userinfo"] == 0
    record = the_record(proxy, request_id)
    assert record["subject"] == "carol" and record["local_user"] == "carol"

    revoked = checkin.login("carol")
    checkin.revoke(revoked)  # a JWT that still verifies, but the provider has withdrawn it
    response = call(proxy, "GET", f"{api}/jobs", token=revoked)
    assert response.status_code == 401 and reason(response) == "token_inactive"
    opaque = checkin.opaque_token("alice")
    checkin.reset_stats()
    response = call(proxy, "GET", f"{api}/jobs", token=opaque)
    assert response.status_code == 401 and reason(response) == "malformed_token"  # no issuer takes opaque tokens
    assert sum(checkin.stats().values()) == 0


@pytest.fixture(scope="module")
def rotating(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    yield from own_provider(tmp_path_factory, "oidc-rotating")


def _until_refused(proxy: ProxyServer, path: str, token: str, timeout: float = 30) -> httpx.Response:
    """Poll until the proxy refuses ``token``: it learns of a dropped key at its next key-set refresh."""
    deadline = time.monotonic() + timeout
    while True:
        response = call(proxy, "GET", path, token=token)
        if response.status_code != 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.3)


def test_rotated_keys_without_restart_and_dropped_keys_stop_validating(
    slurm: SlurmCluster,
    rotating: OidcProvider,
    proxy_factory: ProxyFactory,
    tmp_path_factory: pytest.TempPathFactory,
    api: str,
) -> None:
    issuer = checkin_issuer(rotating, tmp_path_factory.mktemp("secrets"))
    proxy = start_proxy(proxy_factory, slurm, issuer, CHECKIN_USERS, jwks_cache_seconds=1, jwks_min_refetch_seconds=1)
    assert proxy.proc is not None
    pid = proxy.proc.pid
    old, old_unseen = rotating.login("carol"), rotating.login("carol")
    assert call(proxy, "GET", f"{api}/jobs", token=old).status_code == 200

    new_kid = rotating.rotate_keys()
    time.sleep(1.2)  # precondition: past the proxy's refetch interval
    new = rotating.login("carol")
    assert kid_of(new) == new_kid != kid_of(old)
    response = call(proxy, "GET", f"{api}/jobs", token=new)
    assert response.status_code == 200, response.text
    assert call(proxy, "GET", f"{api}/jobs", token=old).status_code == 200  # the old key is still published

    rotating.drop_old_keys()
    refused = _until_refused(proxy, f"{api}/jobs", old)
    assert refused.status_code == 401 and reason(refused) == "unknown_key", refused.text
    response = call(proxy, "GET", f"{api}/jobs", token=old_unseen)
    assert response.status_code == 401 and reason(response) == "unknown_key"
    assert call(proxy, "GET", f"{api}/jobs", token=new).status_code == 200
    assert proxy.proc is not None and proxy.proc.pid == pid  # never restarted


@pytest.fixture(scope="module")
def flaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    yield from own_provider(tmp_path_factory, "oidc-flaky")


def test_provider_outage_cached_tokens_pass_new_ones_get_503_until_it_is_back(
    slurm: SlurmCluster,
    flaky: OidcProvider,
    proxy_factory: ProxyFactory,
    tmp_path_factory: pytest.TempPathFactory,
    api: str,
    request_id: str,
) -> None:
    issuer = checkin_issuer(flaky, tmp_path_factory.mktemp("secrets"))
    proxy = start_proxy(proxy_factory, slurm, issuer, CHECKIN_USERS, http_timeout_seconds=1)
    cached = flaky.login("carol")
    assert call(proxy, "GET", f"{api}/jobs", token=cached).status_code == 200
    unseen, unseen_opaque = flaky.login("carol"), flaky.opaque_token("alice")

    flaky.stop()
    try:
        for _ in range(2):
            assert call(proxy, "GET", f"{api}/jobs", token=cached).status_code == 200
        for n, token in enumerate((unseen, unseen_opaque)):
            rid = f"{request_id}-down-{n}"
            response = call(proxy, "GET", f"{api}/jobs", token=token, request_id=rid)
            assert response.status_code == 503, response.text
            assert response.headers["content-type"] == "application/json"
            assert reason(response) == "provider_unreachable"
            assert response.json()["errors"][0]["source"] == "slurmproxy"
            assert "www-authenticate" not in response.headers
            record = the_record(proxy, rid)
            assert record["decision"] == "error" and record["status"] == 503 and record["upstream_status"] is None
    finally:
        flaky.start()
    assert flaky.issuer == issuer["issuer"]
    response = call(proxy, "GET", f"{api}/jobs", token=flaky.login("carol"))
    assert response.status_code == 200, response.text

    hung = flaky.login("carol")
    flaky.pause()  # accepts connections, never answers
    try:
        response = call(proxy, "GET", f"{api}/jobs", token=hung)
        assert response.status_code == 503 and reason(response) == "provider_timeout", response.text
        assert call(proxy, "GET", f"{api}/jobs", token=cached).status_code == 200
    finally:
        flaky.resume()
