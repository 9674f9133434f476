"""slurmdbd for real, through the proxy, on every generation: accounting reads, job history after a
job has left slurmctld, VO accounts as associations that slurmctld enforces, and a rule that names
an account its user is not associated with failing the way a site would see it.

Each generation gets a cluster with slurmdbd on its own MariaDB (``AccountingStorageEnforce=
associations,limits,qos``, ``MinJobAge=2``) and the accounts ``vo-example`` (alice, carol, svc-alpha)
and ``vo-other`` (bob, svc-beta).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack import SlurmCluster
from devstack.provider import MEMBER_ENTITLEMENT, OTHER_VO_ENTITLEMENT, PROXY_AUDIENCE, OidcProvider
from devstack.proxy import ProxyServer
from tests.integration.conftest import GENERATIONS, ProxyFactory, call, job_body, proxy_config, records_for

ACCOUNTS = {"vo-example": ["alice", "carol", "svc-alpha"], "vo-other": ["bob", "svc-beta"]}
REFUSED_STATUS = {"22.05": 500, "24.11": 500, "26.05": 422}
"""What slurmrestd answers a submission slurmctld refuses (2045: an account the user may not use)."""


@pytest.fixture(scope="module", params=GENERATIONS, ids=[f"slurm-{g}-accounting" for g in GENERATIONS])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    workdir = tmp_path_factory.mktemp(f"acct-{request.param}")
    with SlurmCluster(workdir, request.param, accounting=True, accounts=ACCOUNTS, min_job_age=2) as cluster:
        yield cluster


def accounting_policy(issuer: str) -> dict[str, Any]:
    return {
        "rules": [
            {
                "id": "vo-example",
                "entitlements": [MEMBER_ENTITLEMENT],
                "allow": ["read-only", "read-accounting", "submit", "cancel-own"],
                "mapping": [{"table": "users"}],
                "job": {"accounts": ["vo-example"]},
            },
            {
                "id": "vo-other",
                "entitlements": [OTHER_VO_ENTITLEMENT],
                "allow": ["read-accounting", "submit"],
                "mapping": [{"service_account": "svc-beta"}],
                "job": {"accounts": ["vo-other"]},
            },
            {
                # a site's mistake: svc-alpha has no association with vo-other
                "id": "misconfigured",
                "issuers": [issuer],
                "subjects": ["dave"],
                "allow": ["submit"],
                "mapping": [{"service_account": "svc-alpha"}],
                "job": {"accounts": ["vo-other"]},
            },
        ],
        "tables": {"users": {"entries": [{"issuer": issuer, "subject": "alice", "user": "alice"}]}},
    }


@pytest.fixture(scope="module")
def accounting_proxy(cluster: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory) -> ProxyServer:
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    return proxy_factory(proxy_config(cluster, [issuer]), {"accounting.yaml": accounting_policy(oidc.issuer)})


def submit(proxy: ProxyServer, cluster: SlurmCluster, token: str, user: str, request_id: str) -> Any:
    version = cluster.api_versions[-1]
    body = job_body(version, cluster.job_dir(user), script="#!/bin/bash\nid\n", name="acct")
    return call(proxy, "POST", f"/slurm/{version}/job/submit", token=token, json=body, request_id=request_id)


def state_of(job: dict[str, Any]) -> str:
    current = job["state"]["current"]  # 22.05: a string; 24.11 and later: a list
    return str(current if isinstance(current, str) else current[0])


def test_vo_jobs_run_in_their_account_and_their_history_outlives_slurmctld(
    accounting_proxy: ProxyServer, cluster: SlurmCluster, oidc: OidcProvider, request_id: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    submitted = submit(accounting_proxy, cluster, token, "alice", request_id)
    assert submitted.status_code == 200, submitted.text
    job_id = int(submitted.json()["job_id"])
    finished = cluster.wait_job(job_id)
    assert (finished["Account"], finished["UserId"], finished["JobState"]) == ("vo-example", "alice(2001)", "COMPLETED")
    cluster.wait_job_gone(job_id)

    gone = call(accounting_proxy, "GET", f"/slurm/{cluster.api_versions[-1]}/job/{job_id}", token=token)
    assert gone.status_code in (404, 500) and gone.json()["errors"][0]["error_number"] == 2017, gone.text
    for version in cluster.slurmdb_versions:
        history = call(accounting_proxy, "GET", f"/slurmdb/{version}/job/{job_id}", token=token)
        assert history.status_code == 200, (version, history.text)
        (job,) = history.json()["jobs"]
        assert (job["account"], job["user"], state_of(job)) == ("vo-example", "alice", "COMPLETED"), version

        accounts = call(accounting_proxy, "GET", f"/slurmdb/{version}/accounts", token=token)
        assert {"vo-example", "vo-other"} <= {a["name"] for a in accounts.json()["accounts"]}, version
        associations = call(accounting_proxy, "GET", f"/slurmdb/{version}/associations", token=token)
        pairs = {(a["account"], a.get("user", "")) for a in associations.json()["associations"]}
        assert {("vo-example", "alice"), ("vo-other", "svc-beta")} <= pairs, version
    record = records_for(accounting_proxy, request_id)[0]
    assert (record["rule"], record["local_user"], record["job_id"]) == ("vo-example", "alice", job_id)


def test_a_rule_naming_an_account_its_user_is_not_associated_with_fails_as_a_site_sees_it(
    accounting_proxy: ProxyServer, cluster: SlurmCluster, oidc: OidcProvider, request_id: str
) -> None:
    """The proxy allows it (the rule says so); slurmctld refuses it, and the caller sees slurmrestd's answer."""
    other = submit(accounting_proxy, cluster, oidc.client_credentials_token("dave-cli"), "svc-alpha", request_id)
    assert other.status_code == REFUSED_STATUS[cluster.generation], other.text
    first = other.json()["errors"][0]
    assert first.get("error_number", first.get("error_code")) == 2045, first
    assert first["error"] == "Invalid account or account/partition combination specified"
    (record,) = records_for(accounting_proxy, request_id)
    assert (record["decision"], record["rule"], record["local_user"]) == ("allow", "misconfigured", "svc-alpha")
    assert record["upstream_status"] == other.status_code and record["job_id"] is None


@pytest.fixture
def wrong_key_proxy(
    cluster: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory, tmp_path: Path
) -> Iterator[ProxyServer]:
    key = tmp_path / "wrong.key"
    key.write_bytes(b"w" * 32)
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    config = proxy_config(cluster, [issuer], upstream={"jwt_key_file": str(key)})
    server = proxy_factory(config, {"accounting.yaml": accounting_policy(oidc.issuer)})
    yield server
    server.stop()


def test_a_rejected_credential_at_slurmdb_is_502_upstream_auth_failed_and_an_outage_is_not(
    wrong_key_proxy: ProxyServer, accounting_proxy: ProxyServer, cluster: SlurmCluster, oidc: OidcProvider
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    for version in cluster.slurmdb_versions:
        rejected = call(wrong_key_proxy, "GET", f"/slurmdb/{version}/jobs", token=token)
        assert rejected.status_code == 502, (version, rejected.text)
        assert rejected.json()["slurmproxy"]["reason"] == "upstream_auth_failed", version
    cluster.stop_slurmdbd()
    try:
        deadline = time.monotonic() + 30
        version = cluster.slurmdb_versions[-1]
        while True:  # slurmrestd notices on its next connection to slurmdbd
            down = call(accounting_proxy, "GET", f"/slurmdb/{version}/jobs", token=token)
            errors = down.json().get("errors") or []
            if any(e.get("error_number") == 7000 for e in errors) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        # slurmdbd's outage passes on as slurmrestd says it (22.05: 200, later: 502), not as a credential problem
        assert down.status_code == (200 if cluster.generation == "22.05" else 502), down.text
        assert any(e.get("error_number") == 7000 for e in errors) and "slurmproxy" not in down.json(), down.text
    finally:
        cluster.start_slurmdbd()
