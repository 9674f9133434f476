from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.asgi import app_client, app_session
from tests.fakeupstream import ThreadedFakeSlurmrestd as Upstream
from tests.helpers import ISSUER, OTHER_VO, VO_MEMBER, Signer, make_settings

pytestmark = pytest.mark.anyio
WHOAMI = "/_slurmproxy/whoami"


def policy() -> dict[str, Any]:
    return {
        "rules": [
            {
                "id": "vo-a",
                "description": "members of vo.example.org",
                "entitlements": [VO_MEMBER],
                "allow": ["ping", "read-only", "submit"],
                "mapping": [{"table": "users"}, {"service_account": "svc-alpha"}],
                "job": {"accounts": ["vo-a"], "partitions": ["debug"]},
            },
            {
                "id": "vo-a-root",
                "entitlements": [VO_MEMBER],
                "allow": ["read-accounting"],
                "mapping": [{"service_account": "root"}],
            },
            {"id": "vo-b", "entitlements": [OTHER_VO], "allow": ["submit"], "mapping": [{"service_account": "b"}]},
        ],
        "tables": {"users": {"entries": [{"issuer": ISSUER, "subject": "alice@example.org", "user": "alice"}]}},
    }


async def test_whoami_tells_identity_entitlements_account_and_operations(
    tmp_path: Path, signer: Signer, upstream: Upstream
) -> None:
    token = signer.token(eduperson_entitlement=[VO_MEMBER, "urn:mace:egi.eu:res:x#aai.egi.eu", "junk"])
    async with app_client(make_settings(tmp_path, policy())) as client:
        response = await client.get(WHOAMI, headers={"Authorization": f"Bearer {token}", "X-Request-ID": "me-1"})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert (body["issuer"], body["subject"], body["account"]) == (ISSUER, "alice@example.org", "alice")
    assert body["entitlements"] == {"considered": [VO_MEMBER], "other_ignored": 1, "malformed_ignored": 1}
    assert body["operations"] == ["ping", "read-accounting", "read-only", "submit"]
    first, second = body["rules"]
    assert first == {
        "id": "vo-a",
        "allows": ["ping", "read-only", "submit"],
        "entitlement": VO_MEMBER,
        "description": "members of vo.example.org",
        "mapping": {"account": "alice", "via": "table:users"},
        "job": {
            "accounts": ["vo-a"],
            "partitions": ["debug"],
            "default_account": "vo-a",
            "default_partition": "debug",
        },
    }
    # a rule whose mapping is unsafe says so
    assert second["mapping"] == {"refused": "account_refused: local account 'root' is refused: it is root"}
    assert "vo-b" not in json.dumps(body)  # rules that do not admit the caller are not disclosed
    assert upstream.get_requests() == []
    (record,) = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert (record["request_id"], record["operation"], record["decision"], record["local_user"]) == (
        "me-1",
        "whoami",
        "allow",
        "alice",
    )
    assert token not in (tmp_path / "audit.log").read_text()


async def test_whoami_for_someone_no_rule_admits(tmp_path: Path, signer: Signer) -> None:
    async with app_client(make_settings(tmp_path, policy())) as client:
        token = signer.token(sub="mallory", eduperson_entitlement=[])
        body = (await client.get(WHOAMI, headers={"Authorization": f"Bearer {token}"})).json()
    assert (body["subject"], body["account"], body["operations"], body["rules"]) == ("mallory", None, [], [])


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [
        pytest.param({}, 401, "missing_token", id="no-token"),
        pytest.param({"Authorization": "Bearer x.y.z"}, 401, "malformed_token", id="bad-token"),
    ],
)
async def test_whoami_needs_a_valid_token(
    tmp_path: Path, signer: Signer, headers: dict[str, str], status: int, reason: str
) -> None:
    # `signer` answers the key fetch the app starts in the background, whenever it runs.
    async with app_client(make_settings(tmp_path, policy())) as client:
        response = await client.get(WHOAMI, headers=headers)
    assert response.status_code == status and response.json()["slurmproxy"]["reason"] == reason
    (record,) = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert (record["decision"], record["reason"], record["operation"]) == ("deny", reason, "whoami")


async def test_whoami_shows_a_pool_account_without_leasing_it(tmp_path: Path, signer: Signer) -> None:
    pooled = policy()
    pooled["rules"][0]["mapping"] = [{"pool": "vo"}]
    identity = {"pools": {"vo": {"accounts": ["pool001..pool002"]}}, "pool_database": str(tmp_path / "l.sqlite")}
    settings = make_settings(tmp_path, pooled, identity=identity)
    async with app_session(settings) as (client, state):
        body = (await client.get(WHOAMI, headers={"Authorization": f"Bearer {signer.token()}"})).json()
        leases = await state["runtime"].mapper.pools.find("vo", ISSUER, "alice@example.org")
    assert body["rules"][0]["mapping"] == {
        "account": "pool001",
        "via": "pool:vo",
        "detail": {"lease": "would lease", "pool": "vo", "free": 2},
    }
    assert leases is None  # asking who you are never takes a lease
