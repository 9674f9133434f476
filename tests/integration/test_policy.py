"""Issue 4 on real Slurm: per-VO accounts, partitions and limits; refused bodies never reach Slurm; live reload.

Slurm has partitions ``debug`` (its default) and ``long``. Without slurmdbd Slurm accepts any account
name, so the proxy is what keeps a VO to its own account: the tests read the account Slurm records.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from devstack import SlurmCluster
from devstack.provider import MEMBER_ENTITLEMENT, OTHER_VO_ENTITLEMENT, PROXY_AUDIENCE, OidcProvider
from devstack.proxy import ProxyServer
from tests.integration.conftest import ProxyFactory, call, job_body, proxy_config, records_for

SITE = "site.yaml"


def vo_policy(issuer: str, vo_a_allows: list[str] | None = None) -> dict[str, Any]:
    """VO A (vo.example.org, alice) runs in account vo-a on partition long; VO B in vo-b on debug."""
    return {
        "rules": [
            {
                "id": "vo-a",
                "entitlements": [MEMBER_ENTITLEMENT],
                "allow": vo_a_allows or ["ping", "read-only", "submit", "update-own", "cancel-own"],
                "mapping": [{"table": "users"}],
                "job": {
                    "accounts": ["vo-a"],
                    "partitions": ["long"],
                    "max_time": "2:00:00",
                    "default_time": 30,
                    "max_nodes": 2,
                },
            },
            {
                "id": "vo-b",
                "entitlements": [OTHER_VO_ENTITLEMENT],
                "allow": ["ping", "submit"],
                "mapping": [{"service_account": "svc-beta"}],
                "job": {"accounts": ["vo-b"], "partitions": ["debug"]},
            },
        ],
        "tables": {"users": {"entries": [{"issuer": issuer, "subject": "alice", "user": "alice"}]}},
    }


def start(
    factory: ProxyFactory, slurm: SlurmCluster, oidc: OidcProvider, interval: float = 0, **policy: Any
) -> ProxyServer:
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    config = proxy_config(slurm, [issuer], policy={"reload_interval_seconds": interval})
    return factory(config, {SITE: vo_policy(oidc.issuer, **policy)})


def body(api: str, slurm: SlurmCluster, **job: Any) -> dict[str, Any]:
    """A batch job for alice that names no partition (job_body's default is removed) unless asked."""
    data = job_body(api, slurm.job_dir("alice"), **job)
    if "partition" not in job:
        data["job"].pop("partition")
    return data


def policy_status(proxy: ProxyServer, token: str) -> dict[str, Any]:
    """The readiness details' policy part: for a caller the policy admits (issue 15, item 9)."""
    details: dict[str, Any] = call(proxy, "GET", "/_slurmproxy/ready", token=token).json()["checks"]["policy"]
    return details


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def rewrite(proxy: ProxyServer, content: dict[str, Any] | str) -> None:
    """Replace the policy file the way an admin should: write a new file, rename it over the old one."""
    target = proxy.workdir / "policies" / SITE
    tmp = target.with_suffix(".new")
    tmp.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    tmp.rename(target)


def job_ids(slurm: SlurmCluster) -> set[str]:
    return {j["JobId"] for j in slurm.jobs()}


def test_a_vo_job_lands_in_the_vo_account_and_partition(
    slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory, api: str, request_id: str
) -> None:
    proxy = start(proxy_factory, slurm, oidc)
    token = oidc.client_credentials_token("alice-cli")
    response = call(proxy, "POST", f"{api}/job/submit", token=token, request_id=request_id, json=body(api, slurm))
    assert response.status_code == 200, response.text
    job = slurm.wait_job(response.json()["job_id"])
    assert (job["Account"], job["Partition"], job["UserId"]) == ("vo-a", "long", "alice(2001)")
    assert job["TimeLimit"] == "00:30:00"  # the rule's default_time, filled in by the proxy
    assert job["JobState"] == "COMPLETED"
    (record,) = records_for(proxy, request_id)
    assert (record["rule"], record["decision"], record["local_user"]) == ("vo-a", "allow", "alice")


@pytest.mark.parametrize(
    ("job", "reason", "field"),
    [
        pytest.param({"partition": "debug"}, "job_partition_not_allowed", "job.partition", id="vo-b-partition"),
        pytest.param({"account": "vo-b"}, "job_account_not_allowed", "job.account", id="vo-b-account"),
        pytest.param({"user_id": "alice"}, "job_field_not_allowed", "job.user_id", id="user-id"),
        pytest.param({"time_limit": 121}, "job_time_limit_exceeded", "job.time_limit", id="time-limit"),
        pytest.param({"reboot": True}, "job_field_not_allowed", "job.reboot", id="field-outside-allow-list"),
    ],
)
def test_refused_submissions_never_reach_slurm(
    slurm: SlurmCluster,
    oidc: OidcProvider,
    proxy_factory: ProxyFactory,
    api: str,
    request_id: str,
    job: dict[str, Any],
    reason: str,
    field: str,
) -> None:
    proxy = start(proxy_factory, slurm, oidc)
    token = oidc.client_credentials_token("alice-cli")
    before = job_ids(slurm)
    slurm.reset_diag()
    response = call(
        proxy, "POST", f"{api}/job/submit", token=token, request_id=request_id, json=body(api, slurm, **job)
    )
    assert response.status_code == 403, response.text
    answer = response.json()
    assert answer["slurmproxy"]["reason"] == reason and field in answer["errors"][0]["error"]
    assert job_ids(slurm) == before
    assert slurm.diag().get("REQUEST_SUBMIT_BATCH_JOB", 0) == 0  # not even an attempt reached slurmctld
    (record,) = records_for(proxy, request_id)
    assert (record["decision"], record["reason"], record["upstream_status"]) == ("deny", reason, None)


def test_job_updates_are_checked_too(
    slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory, api: str, request_id: str
) -> None:
    proxy = start(proxy_factory, slurm, oidc)
    token = oidc.client_credentials_token("alice-cli")
    submitted = call(proxy, "POST", f"{api}/job/submit", token=token, json=body(api, slurm, hold=True))
    assert submitted.status_code == 200, submitted.text
    job_id = submitted.json()["job_id"]
    try:
        moved = call(
            proxy, "POST", f"{api}/job/{job_id}", token=token, request_id=request_id, json={"partition": "debug"}
        )
        assert moved.status_code == 403 and moved.json()["slurmproxy"]["reason"] == "job_partition_not_allowed"
        too_long = call(proxy, "POST", f"{api}/job/{job_id}", token=token, json={"time_limit": 500})
        assert too_long.status_code == 403
        shorter = call(proxy, "POST", f"{api}/job/{job_id}", token=token, json={"time_limit": 20})
        assert shorter.status_code == 200, shorter.text
        job = slurm.job(job_id)
        assert (job["Partition"], job["TimeLimit"]) == ("long", "00:20:00")
    finally:
        call(proxy, "DELETE", f"{api}/job/{job_id}", token=token)


def test_whoami_on_the_real_server(slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory) -> None:
    proxy = start(proxy_factory, slurm, oidc)
    me = call(proxy, "GET", "/_slurmproxy/whoami", token=oidc.client_credentials_token("alice-cli"))
    assert me.status_code == 200, me.text
    answer = me.json()
    assert (answer["subject"], answer["account"]) == ("alice", "alice")
    assert answer["entitlements"]["considered"] == [MEMBER_ENTITLEMENT]
    assert [r["id"] for r in answer["rules"]] == ["vo-a"] and "submit" in answer["operations"]
    assert answer["rules"][0]["job"]["partitions"] == ["long"]


def test_sighup_reload_removes_the_submit_right_without_a_restart(
    slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory, api: str
) -> None:
    proxy = start(proxy_factory, slurm, oidc)  # no file watching: only SIGHUP reloads
    pid = proxy.proc.pid if proxy.proc else None
    token = oidc.client_credentials_token("alice-cli")
    assert call(proxy, "POST", f"{api}/job/submit", token=token, json=body(api, slurm)).status_code == 200
    rewrite(proxy, vo_policy(oidc.issuer, vo_a_allows=["ping", "read-only"]))
    proxy.signal(signal.SIGHUP)
    wait_for("the reload", lambda: policy_status(proxy, token)["reloads"] == 1)
    before = job_ids(slurm)
    refused = call(proxy, "POST", f"{api}/job/submit", token=token, json=body(api, slurm))
    assert refused.status_code == 403 and refused.json()["slurmproxy"]["reason"] == "operation_not_allowed"
    assert job_ids(slurm) == before
    assert call(proxy, "GET", f"{api}/ping", token=token).status_code == 200
    assert proxy.proc is not None and proxy.proc.pid == pid and proxy.proc.poll() is None  # the same process


def test_a_file_change_is_picked_up_and_a_corrupt_file_keeps_the_old_policy(
    slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory, api: str, request_id: str
) -> None:
    proxy = start(proxy_factory, slurm, oidc, interval=0.2)
    token = oidc.client_credentials_token("alice-cli")
    first_digest = policy_status(proxy, token)["digest"]

    rewrite(proxy, "rules: [ {id: broken")  # not YAML
    wait_for("the failed reload", lambda: policy_status(proxy, token)["failures"] == 1)
    status = policy_status(proxy, token)
    assert status["status"].startswith("stale") and status["digest"] == first_digest
    assert any("not valid YAML" in e for e in status["errors"])
    kept = call(proxy, "POST", f"{api}/job/submit", token=token, request_id=request_id, json=body(api, slurm))
    assert kept.status_code == 200, kept.text  # the last good policy is still in force
    assert slurm.wait_job(kept.json()["job_id"])["Account"] == "vo-a"
    assert "policy reload (file change) failed" in proxy.log_tail(80)

    without_submit = vo_policy(oidc.issuer, vo_a_allows=["ping"])
    rewrite(proxy, without_submit)
    wait_for("the reload", lambda: policy_status(proxy, token)["reloads"] == 1)
    status = policy_status(proxy, token)
    assert status["status"] == "ok" and status["errors"] == [] and status["digest"] != first_digest
    refused = call(proxy, "POST", f"{api}/job/submit", token=token, json=body(api, slurm))
    assert refused.status_code == 403
    assert json.loads(refused.text)["slurmproxy"]["reason"] == "operation_not_allowed"
