"""The mapper with every backend: steps in order, no fallback past a failure or a refusal, and the
proxy's audit record of a lease. Plus the start-up checks in ``identity.backends``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import httpx
import pytest
from pytest_httpx import HTTPXMock

from slurmproxy.config.settings import AliseSettings, IdentitySettings
from slurmproxy.errors import ConfigError, DependencyError, IdentityMappingError, PolicyError
from slurmproxy.identity import AccountGuard, IdentityMapper, check_identity_config, check_policy_backends
from slurmproxy.identity.alise import AliseClient
from slurmproxy.identity.pool import LeaseStore, Pools
from slurmproxy.policy import load_policy
from tests.asgi import app_client
from tests.fakeupstream import ThreadedFakeSlurmrestd as Upstream
from tests.helpers import (
    ISSUER,
    JWKS_URI,
    UPSTREAM,
    VO_MEMBER,
    Signer,
    basic_policy,
    discovery,
    make_settings,
    write_policy,
)
from tests.policy.test_rules import principal

pytestmark = pytest.mark.anyio
UIDS = {"alice": 2001, "svc-alpha": 2101, "jdoe": 2500, "pool001": 3001, "pool002": 3002, "daemonish": 500}
ALISE = "https://alise.example.org"


def guard() -> AccountGuard:
    return AccountGuard(IdentitySettings(), lookup=UIDS.get)


def alise_url(subject: str) -> str:
    digest = hashlib.sha1(ISSUER.encode(), usedforsecurity=False).hexdigest()
    return f"{ALISE}/api/v1/target/hpc/mapping/issuer/{digest}/user/{quote_plus(subject)}?apikey=k3y"


def linked(subject: str, username: str) -> dict[str, Any]:
    return {"internal": {"username": username, "sub": "x", "iss": "y"}, "external": [{"iss": ISSUER, "sub": subject}]}


def alise_client(tmp_path: Path) -> AliseClient:
    (tmp_path / "alise.key").write_text("k3y")
    return AliseClient.create("site", AliseSettings(url=ALISE, site="hpc", apikey_file=tmp_path / "alise.key"))


def policy_with(tmp_path: Path, mapping: list[dict[str, str]]) -> Any:
    return load_policy([write_policy(tmp_path / "p", basic_policy(mapping=mapping))])


async def test_alise_answer_wins_and_a_miss_falls_through(tmp_path: Path, httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=alise_url("alice@example.org"), json=linked("alice@example.org", "jdoe"))
    httpx_mock.add_response(
        url=alise_url("bob@example.org"), status_code=401, json={"detail": [{"type": "not-mapped"}]}
    )
    policy = policy_with(tmp_path, [{"alise": "site"}, {"service_account": "svc-alpha"}])
    mapper = IdentityMapper(guard(), alise={"site": alise_client(tmp_path)})
    account = await mapper.map(policy, policy.rules[0], principal(VO_MEMBER, subject="alice@example.org"))
    assert (account.name, account.source, account.uid, account.detail) == (
        "jdoe",
        "alise:site",
        2500,
        {"alise": "alise"},
    )
    shared = await mapper.map(policy, policy.rules[0], principal(VO_MEMBER, subject="bob@example.org"))
    assert shared.name == "svc-alpha"


async def test_alise_outage_never_falls_through_to_the_next_step(tmp_path: Path, httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=alise_url("alice@example.org"))
    policy = policy_with(tmp_path, [{"alise": "site"}, {"service_account": "svc-alpha"}])
    mapper = IdentityMapper(guard(), alise={"site": alise_client(tmp_path)})
    with pytest.raises(DependencyError) as err:
        await mapper.map(policy, policy.rules[0], principal(VO_MEMBER, subject="alice@example.org"))
    assert err.value.status_code == 503 and err.value.reason == "alise_unreachable"


async def test_alise_answer_refused_by_the_guard(tmp_path: Path, httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=alise_url("alice@example.org"), json=linked("alice@example.org", "daemonish"))
    policy = policy_with(tmp_path, [{"alise": "site"}, {"service_account": "svc-alpha"}])
    mapper = IdentityMapper(guard(), alise={"site": alise_client(tmp_path)})
    with pytest.raises(IdentityMappingError) as err:
        await mapper.map(policy, policy.rules[0], principal(VO_MEMBER, subject="alice@example.org"))
    assert err.value.reason == "account_refused" and "below the minimum" in err.value.detail


async def test_pool_step_leases_and_explain_does_not(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path / "l.sqlite", {"vo": ("pool001", "pool002")}).open()
    policy = policy_with(tmp_path, [{"table": "users"}, {"pool": "vo"}])
    mapper = IdentityMapper(guard(), pools=Pools(store))
    bob = principal(VO_MEMBER, subject="bob@example.org")
    (table, pool) = await mapper.explain(policy, policy.rules[0], bob)
    assert (table.answer, table.note) == (None, "no answer; next step")
    assert (pool.answer, pool.chosen, pool.detail["lease"]) == ("pool001", True, "would lease")
    assert store.leases() == []
    account = await mapper.map(policy, policy.rules[0], bob)
    assert (account.name, account.source) == ("pool001", "pool:vo")
    assert account.detail is not None and account.detail["lease"] == "new"
    again = await mapper.map(policy, policy.rules[0], bob)
    assert again.detail is not None and again.detail["lease"] == "existing"
    alice = await mapper.map(policy, policy.rules[0], principal(VO_MEMBER, subject="alice@example.org"))
    assert alice.name == "alice"  # the table answers first: no lease taken
    assert [lease.subject for lease in store.leases()] == ["bob@example.org"]


async def test_explain_marks_refusals_and_unreached_steps(tmp_path: Path) -> None:
    data = basic_policy(mapping=[{"table": "users"}, {"service_account": "svc-alpha"}])
    data["tables"]["users"]["entries"][0]["user"] = "root"
    policy = load_policy([write_policy(tmp_path, data)])
    reports = await IdentityMapper(guard()).explain(policy, policy.rules[0], principal(VO_MEMBER))
    assert reports[0].answer == "root" and reports[0].error is not None and "account_refused" in reports[0].error
    assert reports[1].note == "not reached" and not reports[1].chosen


def test_policy_steps_must_name_configured_backends(tmp_path: Path) -> None:
    policy = policy_with(tmp_path, [{"alise": "nope"}, {"pool": "missing"}])
    with pytest.raises(PolicyError) as err:
        check_policy_backends(policy, IdentitySettings())
    assert len(err.value.errors) == 2
    assert "rule members: mapping[0]: alise 'nope' is not configured under identity.alise" in err.value.errors[0]
    assert "policy.yaml" in err.value.errors[1] and "identity.pools" in err.value.errors[1]


def test_identity_config_check_reads_the_alise_key(tmp_path: Path) -> None:
    settings = IdentitySettings(alise={"x": AliseSettings(url=ALISE, site="s", apikey_file=tmp_path / "missing")})
    with pytest.raises(ConfigError, match="apikey_file"):
        check_identity_config(settings)


def pool_settings(tmp_path: Path) -> Any:
    policy = basic_policy(mapping=[{"table": "users"}, {"pool": "vo"}])
    return make_settings(
        tmp_path,
        policy,
        identity={"pools": {"vo": {"accounts": ["pool001..pool002"]}}, "pool_database": str(tmp_path / "l.sqlite")},
    )


async def test_proxy_records_the_lease_and_answers_503_when_the_pool_is_full(
    tmp_path: Path, httpx_mock: HTTPXMock, upstream: Upstream
) -> None:
    signer = Signer()
    httpx_mock.add_response(url=f"{ISSUER}/.well-known/openid-configuration", json=discovery(), is_reusable=True)
    httpx_mock.add_response(url=JWKS_URI, json=signer.jwks(), is_reusable=True)
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.38/ping", json={"pings": []}, is_reusable=True)
    async with app_client(pool_settings(tmp_path)) as client:
        for n in range(4):
            token = signer.token(sub=f"user{n % 3}@example.org")
            response = await client.get("/slurm/v0.0.38/ping", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == (503 if n == 2 else 200), response.text
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [r["mapping_detail"] for r in records][:2] == [
        {"lease": "new", "pool": "vo", "account": "pool001", "leased_at": records[0]["mapping_detail"]["leased_at"]},
        {"lease": "new", "pool": "vo", "account": "pool002", "leased_at": records[1]["mapping_detail"]["leased_at"]},
    ]
    assert records[2]["reason"] == "pool_exhausted" and records[2]["status"] == 503
    assert "pool vo has no free account" in records[2]["detail"]
    assert records[3]["mapping_detail"]["lease"] == "existing" and records[3]["local_user"] == "pool001"
    assert [r.headers["x-slurm-user-name"] for r in upstream.get_requests()] == ["pool001", "pool002", "pool001"]
