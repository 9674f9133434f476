"""Issue 5: identity mapping with real parts: Slurm 22.05 and 24.11, the OpenID provider, and the
real ALISE 1.1.5 (devstack/alise.py) on loopback with a seeded database.

Identities: machine clients of the provider, one per subject (``newcomer-000`` …), each with the
VO entitlement in its token. The devstack's Unix users pool001…pool050 (uids 3001…3050) are the pool.
"""

from __future__ import annotations

import asyncio
import json
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import SlurmCluster
from devstack.alise import AliseServer
from devstack.provider import MEMBER_ENTITLEMENT, PROXY_AUDIENCE, OidcProvider, default_config, machine_client
from devstack.proxy import ProxyServer
from tests.integration.conftest import ProxyFactory, call, job_body, proxy_config, records_for

NEWCOMERS = 100
LINKED = {"linked-user": "carol", "linked-stale": "bob"}


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    config = default_config()
    subjects = [f"newcomer-{n:03d}" for n in range(NEWCOMERS)] + ["tabled-user", *LINKED]
    config["clients"] += [machine_client(f"{s}-cli", s, [MEMBER_ENTITLEMENT]) for s in subjects]
    with OidcProvider(tmp_path_factory.mktemp("oidc-identities"), config) as provider:
        yield provider


@pytest.fixture(scope="module")
def tokens(idp: OidcProvider) -> dict[str, str]:
    """One token per subject (access tokens live an hour: enough for the module)."""
    return {
        c["devstack"]["account"]: idp.client_credentials_token(c["client_id"])
        for c in idp.config["clients"]
        if c["client_id"].endswith("-cli") and c["client_id"][:-4] == c["devstack"].get("account")
    }


@pytest.fixture(scope="module")
def alise(idp: OidcProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AliseServer]:
    with AliseServer(tmp_path_factory.mktemp("alise"), idp.issuer) as server:
        for subject, user in LINKED.items():
            server.link(subject, user)
        yield server


def mapping_policy(issuer: str) -> dict[str, Any]:
    allow = ["ping", "read-only", "submit", "cancel-own"]
    return {
        "rules": [
            {
                "id": "stale-tolerant",
                "issuers": [issuer],
                "subjects": ["linked-stale"],
                "allow": allow,
                "mapping": [{"alise": "site-last-known"}],
            },
            {
                "id": "members",
                "entitlements": [MEMBER_ENTITLEMENT],
                "allow": allow,
                "mapping": [{"table": "users"}, {"alise": "site"}, {"pool": "vo"}],
            },
        ],
        "tables": {"users": {"entries": [{"issuer": issuer, "subject": "tabled-user", "user": "dave"}]}},
    }


def alise_settings(alise: AliseServer, key: Path, **extra: Any) -> dict[str, Any]:
    return {"url": alise.url, "site": alise.site, "apikey_file": str(key), "timeout_seconds": 3, **extra}


@pytest.fixture(scope="module")
def mapped(
    slurm: SlurmCluster,
    idp: OidcProvider,
    alise: AliseServer,
    proxy_factory: ProxyFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> ProxyServer:
    state = tmp_path_factory.mktemp("mapping-state")
    key = alise.write_apikey(state / "alise.key")
    identity = {
        "alise": {
            "site": alise_settings(alise, key),
            "site-last-known": alise_settings(alise, key, cache_seconds=0, outage="last_known"),
        },
        "pools": {"vo": {"accounts": ["pool001..pool050"]}},
        "pool_database": str(state / "leases.sqlite"),
    }
    issuer = {"issuer": idp.issuer, "audiences": [PROXY_AUDIENCE]}
    return proxy_factory(proxy_config(slurm, [issuer], identity=identity), {"site.yaml": mapping_policy(idp.issuer)})


def the_record(proxy: ProxyServer, request_id: str) -> dict[str, Any]:
    (record,) = records_for(proxy, request_id)
    return record


def run_job(proxy: ProxyServer, slurm: SlurmCluster, api: str, token: str, user: str, rid: str) -> dict[str, str]:
    """Submit ``id`` through the proxy into ``user``'s job directory; return Slurm's view of the finished job."""
    body = job_body(api, slurm.job_dir(user))
    response = call(proxy, "POST", f"{api}/job/submit", token=token, request_id=rid, json=body)
    assert response.status_code == 200, response.text
    job = slurm.wait_job(response.json()["job_id"])
    assert job["JobState"] == "COMPLETED", job
    return job


def uid_of(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def test_table_mapped_job_runs_as_the_tables_account(
    mapped: ProxyServer, slurm: SlurmCluster, tokens: dict[str, str], api: str, request_id: str
) -> None:
    job = run_job(mapped, slurm, api, tokens["tabled-user"], "dave", request_id)
    assert job["UserId"] == f"dave({uid_of('dave')})"
    record = the_record(mapped, request_id)
    assert (record["subject"], record["local_user"], record["mapping"]) == ("tabled-user", "dave", "table:users")


def test_alise_linked_job_runs_as_the_linked_account(
    mapped: ProxyServer, slurm: SlurmCluster, tokens: dict[str, str], api: str, request_id: str
) -> None:
    job = run_job(mapped, slurm, api, tokens["linked-user"], "carol", request_id)
    assert job["UserId"] == f"carol({uid_of('carol')})"
    record = the_record(mapped, request_id)
    assert (record["local_user"], record["mapping"]) == ("carol", "alise:site")
    assert record["mapping_detail"]["alise"] in ("alise", "cache")


def test_pool_newcomer_job_runs_as_the_leased_account(
    mapped: ProxyServer, slurm: SlurmCluster, tokens: dict[str, str], api: str, request_id: str
) -> None:
    ping = call(mapped, "GET", f"{api}/ping", token=tokens["newcomer-000"], request_id=f"{request_id}-ping")
    assert ping.status_code == 200, ping.text
    lease = the_record(mapped, f"{request_id}-ping")["mapping_detail"]
    assert lease["pool"] == "vo" and lease["account"].startswith("pool")
    account = lease["account"]
    job = run_job(mapped, slurm, api, tokens["newcomer-000"], account, request_id)
    assert job["UserId"] == f"{account}({uid_of(account)})"
    output = (slurm.job_dir(account) / f"out-{job['JobId']}.txt").read_text()
    assert output.startswith(f"uid={uid_of(account)}({account})")
    record = the_record(mapped, request_id)
    assert (record["local_user"], record["mapping"]) == (account, "pool:vo")
    assert record["mapping_detail"]["lease"] == "existing"


def test_alise_down_fail_closed_is_503_and_nothing_reaches_slurm(
    mapped: ProxyServer, slurm: SlurmCluster, alise: AliseServer, tokens: dict[str, str], api: str, request_id: str
) -> None:
    before = {j["JobId"] for j in slurm.jobs()}
    alise.stop()
    try:
        body = job_body(api, slurm.job_dir("pool050"))
        response = call(
            mapped, "POST", f"{api}/job/submit", token=tokens["newcomer-099"], request_id=request_id, json=body
        )
        assert response.status_code == 503, response.text
        assert response.json()["slurmproxy"]["reason"] == "alise_unreachable"
        assert "ALISE site" in response.json()["errors"][0]["error"]
        assert alise.apikey not in response.text
    finally:
        alise.start()
    assert {j["JobId"] for j in slurm.jobs()} == before
    record = the_record(mapped, request_id)
    assert record["decision"] == "error" and record["upstream_status"] is None and record["local_user"] is None
    assert alise.apikey not in json.dumps(mapped.audit_records()) and alise.apikey not in mapped.log_tail(10_000)
    again = call(mapped, "GET", f"{api}/ping", token=tokens["linked-user"])
    assert again.status_code == 200


def test_alise_down_last_known_serves_the_last_mapping(
    mapped: ProxyServer, alise: AliseServer, tokens: dict[str, str], api: str, request_id: str
) -> None:
    token = tokens["linked-stale"]
    assert call(mapped, "GET", f"{api}/ping", token=token, request_id=f"{request_id}-up").status_code == 200
    assert the_record(mapped, f"{request_id}-up")["mapping_detail"] == {"alise": "alise"}
    alise.stop()
    try:
        response = call(mapped, "GET", f"{api}/ping", token=token, request_id=request_id)
    finally:
        alise.start()
    assert response.status_code == 200, response.text
    record = the_record(mapped, request_id)
    assert record["local_user"] == "bob" and record["mapping_detail"]["alise"] == "last_known"


async def _concurrently(proxy: ProxyServer, path: str, tokens: list[str]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(tokens))
    async with httpx.AsyncClient(base_url=proxy.url, timeout=120, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.get(path, headers={"Authorization": f"Bearer {t}", "X-Request-ID": f"crowd-{n:03d}"})
                for n, t in enumerate(tokens)
            )
        )


def test_51st_newcomer_on_a_50_account_pool_is_503(mapped: ProxyServer, tokens: dict[str, str], api: str) -> None:
    crowd = [tokens[f"newcomer-{n:03d}"] for n in range(51)]
    responses = asyncio.run(_concurrently(mapped, f"{api}/ping", crowd))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 50 + [503], [r.text for r in responses if r.status_code != 200]
    (refused,) = [r for r in responses if r.status_code == 503]
    assert refused.json()["slurmproxy"]["reason"] == "pool_exhausted"
    assert "pool vo has no free account: all 50 are leased" in refused.json()["errors"][0]["error"]


@pytest.fixture(scope="module")
def crowd_proxy(
    slurm: SlurmCluster, idp: OidcProvider, proxy_factory: ProxyFactory, tmp_path_factory: pytest.TempPathFactory
) -> ProxyServer:
    """Two worker processes sharing one lease database; a pool of 100 accounts (pool051… do not exist
    on this host, so require_local_account is off; requests are pings)."""
    state = tmp_path_factory.mktemp("crowd-state")
    identity = {
        "require_local_account": False,
        "pools": {"big": {"accounts": ["pool001..pool100"]}},
        "pool_database": str(state / "leases.sqlite"),
    }
    policy = {
        "rules": [
            {"id": "members", "entitlements": [MEMBER_ENTITLEMENT], "allow": ["ping"], "mapping": [{"pool": "big"}]}
        ]
    }
    config = proxy_config(
        slurm, [{"issuer": idp.issuer, "audiences": [PROXY_AUDIENCE]}], identity=identity, server={"workers": 2}
    )
    return proxy_factory(config, {"site.yaml": policy})


def worker_pids(proxy: ProxyServer) -> list[int]:
    assert proxy.proc is not None
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proxy.proc.pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def leases_cli(proxy: ProxyServer) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "slurmproxy", "mapping", "leases", "--config", str(proxy.config_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    leases: list[dict[str, Any]] = json.loads(out.stdout)
    return leases


def test_100_new_identities_through_2_workers_get_100_distinct_leases_kept_across_restart(
    crowd_proxy: ProxyServer, tokens: dict[str, str], api: str
) -> None:
    assert len(worker_pids(crowd_proxy)) >= 2  # uvicorn's supervisor with two worker processes
    subjects = [f"newcomer-{n:03d}" for n in range(NEWCOMERS)]
    responses = asyncio.run(_concurrently(crowd_proxy, f"{api}/ping", [tokens[s] for s in subjects]))
    assert [r.status_code for r in responses] == [200] * NEWCOMERS, {r.text for r in responses if r.status_code != 200}
    first = {lease["subject"]: lease["account"] for lease in leases_cli(crowd_proxy)}
    assert sorted(first) == subjects
    assert len(set(first.values())) == NEWCOMERS
    records = [r for r in crowd_proxy.audit_records() if r["request_id"].startswith("crowd-")]
    assert sorted(r["mapping_detail"]["account"] for r in records) == sorted(first.values())
    assert {r["mapping_detail"]["lease"] for r in records} == {"new"}

    crowd_proxy.restart()
    responses = asyncio.run(_concurrently(crowd_proxy, f"{api}/ping", [tokens[s] for s in subjects]))
    assert [r.status_code for r in responses] == [200] * NEWCOMERS
    after = {lease["subject"]: lease["account"] for lease in leases_cli(crowd_proxy)}
    assert after == first
    latest = {r["subject"]: r for r in crowd_proxy.audit_records() if r["request_id"].startswith("crowd-")}
    assert {r["mapping_detail"]["lease"] for r in latest.values()} == {"existing"}
    assert {s: r["local_user"] for s, r in latest.items()} == first


def test_mapping_show_asks_the_real_alise(mapped: ProxyServer, idp: OidcProvider) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "slurmproxy",
            "mapping",
            "show",
            "--config",
            str(mapped.config_path),
            "--issuer",
            idp.issuer,
            "--subject",
            "linked-user",
            "--rule",
            "members",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    (rule,) = json.loads(out.stdout)["rules"]
    table, alise_step, pool = rule["steps"]
    assert table["answer"] is None and pool["note"] == "not reached"
    assert (alise_step["step"], alise_step["answer"], alise_step["chosen"]) == ("alise:site", "carol", True)
