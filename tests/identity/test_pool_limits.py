"""Pool limits through the proxy (issue 15, item 11), embedded backend: a rule's ``max_leases`` and a pool's
admission rate reach the client, the audit record and the metrics; idle leases go to newcomers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pytest_httpx import HTTPXMock

from slurmproxy.errors import PoolCapReached
from slurmproxy.identity import IdentityMapper
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
from tests.identity.test_mapper import guard
from tests.policy.test_rules import principal

pytestmark = pytest.mark.anyio
PING = "/slurm/v0.0.38/ping"


async def test_max_leases_of_a_rules_pool_step_caps_its_newcomers(tmp_path: Path) -> None:
    policy = load_policy([write_policy(tmp_path, basic_policy(mapping=[{"pool": "vo", "max_leases": 2}]))])
    (rule,) = policy.rules
    assert rule.mapping[0].max_leases == 2 and str(rule.mapping[0]) == "pool:vo"
    store = LeaseStore(tmp_path / "l.sqlite", {"vo": ("pool001", "pool002", "pool003")}).open()
    mapper = IdentityMapper(guard(), pools=Pools(store))
    for subject in ("a@x", "b@x"):
        await mapper.map(policy, rule, principal(VO_MEMBER, subject=subject))
    with pytest.raises(PoolCapReached) as refused:
        await mapper.map(policy, rule, principal(VO_MEMBER, subject="c@x"))
    assert refused.value.status_code == 503 and "rule members may hold at most 2 leases" in refused.value.detail
    assert [lease.rule for lease in store.leases()] == ["members", "members"]
    assert (await mapper.map(policy, rule, principal(VO_MEMBER, subject="a@x"))).name == "pool001"


def test_max_leases_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="max_leases"):
        load_policy([write_policy(tmp_path, basic_policy(mapping=[{"pool": "vo", "max_leases": 0}]))])


async def test_admission_rate_is_a_429_with_retry_after_audited(
    tmp_path: Path, httpx_mock: HTTPXMock, upstream: Upstream
) -> None:
    signer = Signer()
    httpx_mock.add_response(url=f"{ISSUER}/.well-known/openid-configuration", json=discovery(), is_reusable=True)
    httpx_mock.add_response(url=JWKS_URI, json=signer.jwks(), is_reusable=True)
    upstream.add_response(url=f"{UPSTREAM}{PING}", json={"pings": []}, is_reusable=True)
    pool = {"accounts": ["pool001..pool050"], "max_new_leases": 2, "new_lease_period_seconds": 600}
    settings = make_settings(
        tmp_path,
        basic_policy(mapping=[{"pool": "vo"}]),
        identity={"pools": {"vo": pool}, "pool_database": str(tmp_path / "leases.sqlite")},
    )
    async with app_client(settings) as client:
        statuses = []
        for n in range(4):
            answer = await client.get(PING, headers={"Authorization": f"Bearer {signer.token(sub=f'n{n}@x')}"})
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                refused = answer
        again = await client.get(PING, headers={"Authorization": f"Bearer {signer.token(sub='n0@x')}"})
        metrics = (await client.get("/metrics")).text
    assert statuses == [200, 200, 429, 429] and again.status_code == 200
    assert refused.json()["slurmproxy"]["reason"] == "pool_admission_limited"
    assert 590 <= int(refused.headers["retry-after"]) <= 600
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [r["reason"] for r in records if r["status"] == 429] == ["pool_admission_limited"] * 2
    assert 'reason="pool_admission_limited"' in metrics
