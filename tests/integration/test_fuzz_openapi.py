"""schemathesis against the real slurmrestd's own OpenAPI document, through the proxy, with a valid
token and a read-only policy: the proxy itself never answers 5xx, every request has its record, and
nothing the policy denies reaches slurmrestd (checked in slurmrestd's log, slurmctld's RPC counts
and Slurm's job list)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st

from devstack import SlurmCluster
from devstack.provider import MEMBER_ENTITLEMENT, PROXY_AUDIENCE, OidcProvider
from devstack.proxy import ProxyServer
from slurmproxy.policy.operations import builtin_operations
from tests.integration.conftest import ProxyFactory, call, job_body, proxy_config
from tests.integration.hostile import RestdLog, diag_delta

ALLOWED_GROUPS = ["ping", "read-only", "openapi"]
EXAMPLES = {"positive": 300, "negative": 200}  # per Slurm generation: about 10 s on 24.11, 3 s on 22.05
WRITE_RPCS = {
    "REQUEST_SUBMIT_BATCH_JOB",
    "REQUEST_SUBMIT_BATCH_HET_JOB",
    "REQUEST_RESOURCE_ALLOCATION",
    "REQUEST_UPDATE_JOB",
    "REQUEST_KILL_JOB",
    "REQUEST_CANCEL_JOB_STEP",
    "REQUEST_SUSPEND",
    "REQUEST_REQUEUE",
    "REQUEST_RECONFIGURE",
    "REQUEST_RECONFIGURE_WITH_CONFIG",
    "REQUEST_UPDATE_NODE",
    "REQUEST_UPDATE_PARTITION",
    "REQUEST_CREATE_RESERVATION",
    "REQUEST_UPDATE_RESERVATION",
    "REQUEST_DELETE_RESERVATION",
    "REQUEST_SHUTDOWN",
}


@pytest.fixture(scope="module")
def read_only(slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory) -> ProxyServer:
    policy = {
        "rules": [
            {
                "id": "readers",
                "entitlements": [MEMBER_ENTITLEMENT],
                "allow": ALLOWED_GROUPS,
                "mapping": [{"table": "users"}],
            }
        ],
        "tables": {"users": {"entries": [{"issuer": oidc.issuer, "subject": "alice", "user": "alice"}]}},
    }
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    return proxy_factory(proxy_config(slurm, [issuer]), {"readers.yaml": policy})


@pytest.fixture(scope="module")
def writers(slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory) -> ProxyServer:
    """alice may also submit, update and cancel, in account vo-a on partition debug only."""
    policy = {
        "rules": [
            {
                "id": "writers",
                "entitlements": [MEMBER_ENTITLEMENT],
                "allow": [*ALLOWED_GROUPS, "submit", "update-own", "cancel-own"],
                "mapping": [{"table": "users"}],
                "job": {"accounts": ["vo-a"], "partitions": ["debug"], "max_time": 10, "max_nodes": 1},
            }
        ],
        "tables": {"users": {"entries": [{"issuer": oidc.issuer, "subject": "alice", "user": "alice"}]}},
    }
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    return proxy_factory(proxy_config(slurm, [issuer]), {"writers.yaml": policy})


@pytest.fixture
def alices_job(proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str) -> Iterator[int]:
    """A running job of alice's that any DELETE or update getting through would touch."""
    body = job_body(api, slurm.job_dir("alice"), script="#!/bin/bash\nsleep 900\n")
    response = call(proxy, "POST", f"{api}/job/submit", token=oidc.client_credentials_token("alice-cli"), json=body)
    job_id = int(response.json()["job_id"])
    slurm.wait_job(job_id, states=("RUNNING", "PENDING"))
    yield job_id
    slurm.slurm_cmd(["scancel", str(job_id)], check=False)


def allowed_by_policy(method: str, path: str) -> bool:
    """The policy's definition (operation groups), not the proxy's decision code."""
    groups = builtin_operations()
    return any(op.matches(method, path) for group in ALLOWED_GROUPS for op in groups[group])


def _proxy_own_5xx(response: httpx.Response | Any, record: dict[str, Any] | None) -> bool:
    """A 5xx the proxy made itself, not slurmrestd's answer passed on.

    slurmrestd's own 5xx are not always JSON (26.05 answers an unparsable query string with a
    text/plain 500 ``Unspecified error``), so the audit record decides: slurmrestd's answer is one
    whose record has that status as ``upstream_status``. No record at all is the proxy's failure.
    """
    if response.status_code < 500:
        return False
    if record is None or record.get("upstream_status") != response.status_code:
        return True
    try:
        body = response.json()
    except ValueError:
        return False
    errors = body.get("errors") or [] if isinstance(body, dict) else []
    return any(isinstance(e, dict) and e.get("source") == "slurmproxy" for e in errors)


@pytest.mark.parametrize("mode", sorted(EXAMPLES))
def test_fuzzing_slurmrestds_own_api_through_the_proxy(
    read_only: ProxyServer,
    slurm: SlurmCluster,
    oidc: OidcProvider,
    api: str,
    alices_job: int,
    mode: str,
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    auth = {"Authorization": f"Bearer {token}"}
    document = call(read_only, "GET", "/openapi/v3", token=token)
    assert document.status_code == 200
    schema = schemathesis.openapi.from_dict(document.json())
    strategy = schema.as_strategy(schemathesis.GenerationMode(mode))
    restd = RestdLog(slurm)
    mark = restd.mark()
    jobs_before = {j["JobId"] for j in slurm.jobs()}
    diag_before = slurm.diag()
    records_before = len(read_only.audit_records())
    answers: Counter[tuple[str, int]] = Counter()
    five_hundreds: list[tuple[str, str, httpx.Response | Any]] = []

    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        case = data.draw(strategy)
        rid = f"fuzz-{mode}-{sum(answers.values())}"
        response = case.call(base_url=read_only.url, headers={**auth, "X-Request-ID": rid}, timeout=60)
        answers[(case.method.upper(), response.status_code)] += 1
        if response.status_code >= 500:
            five_hundreds.append((rid, f"{case.method} {case.formatted_path}", response))

    fuzz()
    records = {r["request_id"]: r for r in read_only.audit_records()}
    own_5xx = [
        f"{what} -> {response.status_code} {response.text[:200]}"
        for rid, what, response in five_hundreds
        if _proxy_own_5xx(response, records.get(rid))
    ]
    assert own_5xx == [], own_5xx
    assert slurm.job(alices_job)["JobState"] in {"RUNNING", "PENDING"}
    assert {j["JobId"] for j in slurm.jobs()} == jobs_before
    written = {k: v for k, v in diag_delta(diag_before, slurm.diag()).items() if k in WRITE_RPCS}
    assert written == {}, written
    received = restd.since(mark)
    denied_but_received = [(m, p) for m, p in received if not allowed_by_policy(m, p.split("?")[0])]
    assert denied_but_received == []
    assert len(read_only.audit_records()) - records_before == sum(answers.values())
    # The run exercised both sides: requests the policy allows and requests it refuses.
    assert received and any(status == 403 for _, status in answers), answers


def test_fuzzing_job_submission_never_crashes_slurmrestd_or_escapes_the_rules_limits(
    writers: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str
) -> None:
    """With submit, update and cancel allowed, schemathesis's job bodies go through the proxy's body
    checks: slurmrestd stays up (it crashed on a string ``group_id`` before those checks), the proxy
    never answers 5xx itself, and every job Slurm accepted runs as alice in the account and
    partition the rule allows."""
    token = oidc.client_credentials_token("alice-cli")
    document = call(writers, "GET", "/openapi/v3", token=token)
    schema = schemathesis.openapi.from_dict(document.json())
    strategy = schema.as_strategy(schemathesis.GenerationMode.POSITIVE)
    jobs_before = {j["JobId"] for j in slurm.jobs()}
    records_before = len(writers.audit_records())
    answers: Counter[tuple[str, int]] = Counter()
    five_hundreds: list[tuple[str, str, httpx.Response | Any]] = []

    @settings(max_examples=300, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        case = data.draw(strategy)
        rid = f"fuzz-jobs-{sum(answers.values())}"
        headers = {"Authorization": f"Bearer {token}", "X-Request-ID": rid}
        response = case.call(base_url=writers.url, headers=headers, timeout=60)
        answers[(case.method.upper(), response.status_code)] += 1
        if response.status_code >= 500:
            five_hundreds.append((rid, f"{case.method} {case.formatted_path}", response))

    fuzz()
    records = {r["request_id"]: r for r in writers.audit_records()}
    own_5xx = [
        f"{what} -> {response.status_code} {response.text[:200]}"
        for rid, what, response in five_hundreds
        if _proxy_own_5xx(response, records.get(rid))
    ]
    assert own_5xx == [], own_5xx
    assert len(writers.audit_records()) - records_before == sum(answers.values())
    assert call(writers, "GET", f"{api}/ping", token=token).status_code == 200, "slurmrestd went down"
    assert any(method == "POST" and status in {400, 403} for method, status in answers), answers
    for job in slurm.jobs():
        if job["JobId"] not in jobs_before:
            assert job["UserId"] == "alice(2001)" and job["Account"] == "vo-a" and job["Partition"] == "debug", job
            slurm.slurm_cmd(["scancel", job["JobId"]], check=False)
