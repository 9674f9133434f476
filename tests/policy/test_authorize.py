"""The authorization step of the pipeline, driven through the in-process app: operations and job bodies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pytest_httpx import HTTPXMock

from slurmproxy.core.entitlements import parse_all
from slurmproxy.core.principal import Principal
from slurmproxy.errors import AuthorizationError, JobPolicyError, RateLimitedError, RuleRef
from slurmproxy.policy import Authorizer, PolicyRequest, load_policy
from slurmproxy.policy.authorize import THREAD_THRESHOLD_BYTES
from tests.asgi import app_client, app_session
from tests.fakeupstream import ThreadedFakeSlurmrestd as Upstream
from tests.helpers import ISSUER, OTHER_VO, UPSTREAM, VO_MEMBER, Signer, make_settings, write_policy

pytestmark = pytest.mark.anyio
V38, V42 = "/slurm/v0.0.38", "/slurm/v0.0.42"
ENV38, ENV42 = {"PATH": "/bin"}, ["PATH=/bin"]


def vo_policy() -> dict[str, Any]:
    return {
        "rules": [
            {
                "id": "vo-a",
                "entitlements": [VO_MEMBER],
                "allow": ["read-only", "submit", "update-own"],
                "mapping": [{"service_account": "svc-alpha"}],
                "job": {"accounts": ["vo-a"], "partitions": ["debug"], "max_time": 60, "max_nodes": 1},
            },
            {
                "id": "vo-b",
                "entitlements": [OTHER_VO],
                "allow": ["submit", {"methods": ["POST"], "path": "/slurm/{version}/node/{name}"}],
                "mapping": [{"service_account": "svc-beta"}],
                "job": {"accounts": ["vo-b"], "partitions": ["long"]},
            },
        ]
    }


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]


def auth(signer: Signer, *entitlements: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {signer.token(eduperson_entitlement=list(entitlements) or [VO_MEMBER])}"}


@pytest.mark.parametrize(
    ("api", "job", "expected"),
    [
        pytest.param(
            V38,
            {"environment": ENV38},
            {"environment": ENV38, "account": "vo-a", "partition": "debug", "time_limit": 60, "nodes": [1, 1]},
            id="v0.0.38",
        ),
        pytest.param(
            V42,
            {"environment": ENV42, "script": "#!/bin/sh\n"},
            {
                "environment": ENV42,
                "script": "#!/bin/sh\n",
                "account": "vo-a",
                "partition": "debug",
                "time_limit": {"set": True, "infinite": False, "number": 60},
                "maximum_nodes": 1,
            },
            id="v0.0.42",
        ),
    ],
)
async def test_submission_is_forwarded_with_defaults_filled(
    tmp_path: Path,
    httpx_mock: HTTPXMock,
    signer: Signer,
    api: str,
    job: dict[str, Any],
    expected: dict[str, Any],
    upstream: Upstream,
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{api}/job/submit", method="POST", json={"job_id": 7})
    async with app_client(make_settings(tmp_path, vo_policy())) as client:
        response = await client.post(f"{api}/job/submit", json={"script": "x", "job": job}, headers=auth(signer))
    assert response.status_code == 200, response.text
    (sent,) = upstream.get_requests()
    assert json.loads(sent.content)["job"] == expected
    assert int(sent.headers["content-length"]) == len(sent.content)
    intent, record = audit(tmp_path)  # the intent before slurmrestd acted, then the outcome
    assert (intent["kind"], intent["rule"], intent["job_id"]) == ("intent", "vo-a", None)
    assert (record["rule"], record["operation"], record["job_id"]) == ("vo-a", "submit", 7)


@pytest.mark.parametrize(
    ("entitlements", "path", "body", "headers", "status", "reason", "field"),
    [
        pytest.param(
            [VO_MEMBER], f"{V42}/job/submit", {"job": {"partition": "long"}}, {}, 403, "job_partition_not_allowed",
            "job.partition", id="vo-a-asks-vo-b-partition",
        ),
        pytest.param(
            [VO_MEMBER], f"{V38}/job/submit", {"script": "x", "job": {"account": "vo-b"}}, {}, 403,
            "job_account_not_allowed", "job.account", id="vo-a-asks-vo-b-account",
        ),
        pytest.param(
            [OTHER_VO], f"{V42}/job/submit", {"job": {"partition": "debug"}}, {}, 403, "job_partition_not_allowed",
            "job.partition", id="vo-b-asks-vo-a-partition",
        ),
        pytest.param(
            [VO_MEMBER], f"{V42}/job/submit", {"job": {"user_id": "alice"}}, {}, 403, "job_field_not_allowed",
            "job.user_id", id="user-id",
        ),
        pytest.param(
            [VO_MEMBER], f"{V38}/job/submit", {"script": "x", "job": {"time_limit": 61}}, {}, 403,
            "job_time_limit_exceeded", "job.time_limit", id="time-limit",
        ),
        pytest.param(
            [VO_MEMBER], f"{V42}/job/12", {"partition": "long"}, {}, 403, "job_partition_not_allowed", "partition",
            id="update-to-other-partition",
        ),
        pytest.param(
            [VO_MEMBER], f"{V42}/job/submit", b"{not json", {"content-type": "application/json"}, 400, "bad_json",
            None, id="invalid-json",
        ),
        pytest.param(
            [VO_MEMBER], f"{V42}/job/submit", {"job": {"environment": ENV38}}, {}, 400, "bad_job_body", None,
            id="wrong-dialect",
        ),
        pytest.param(
            [VO_MEMBER], f"{V42}/job/submit", b"job: {}", {"content-type": "application/x-yaml"}, 415,
            "unsupported_media_type", None, id="yaml",
        ),
        pytest.param(
            [VO_MEMBER], f"{V42}/job/submit", b"{}", {}, 415, "unsupported_media_type", None, id="no-content-type",
        ),
        pytest.param(
            [OTHER_VO], f"{V42}/job/12", {"partition": "long"}, {}, 403, "operation_not_allowed", None,
            id="operation-checked-before-body",
        ),
    ],
)  # fmt: skip
async def test_refused_bodies_never_reach_slurm(
    tmp_path: Path,
    httpx_mock: HTTPXMock,
    signer: Signer,
    entitlements: list[str],
    path: str,
    body: dict[str, Any] | bytes,
    headers: dict[str, str],
    status: int,
    reason: str,
    field: str | None,
    upstream: Upstream,
) -> None:
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    async with app_client(make_settings(tmp_path, vo_policy())) as client:
        response = await client.post(path, headers={**auth(signer, *entitlements), **headers}, **kwargs)
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["slurmproxy"]["reason"] == reason
    if field is not None:
        assert field in answer["errors"][0]["error"]
    assert upstream.get_requests() == []
    (record,) = audit(tmp_path)
    assert (record["decision"], record["status"], record["reason"]) == ("deny", status, reason)
    assert record["upstream_status"] is None


async def test_body_limits(tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream) -> None:
    settings = make_settings(tmp_path, vo_policy(), server={"max_body_bytes": 2048})
    big = json.dumps({"job": {"name": "x" * 4096}}).encode()

    async def chunked() -> AsyncIterator[bytes]:
        for n in range(0, len(big), 512):
            yield big[n : n + 512]

    headers = {**auth(signer), "content-type": "application/json"}
    async with app_client(settings) as client:
        announced = await client.post(f"{V42}/job/submit", content=big, headers=headers)
        streamed = await client.post(f"{V42}/job/submit", content=chunked(), headers=headers)
    assert (announced.status_code, streamed.status_code) == (413, 413)
    assert "transfer-encoding" not in str(announced.request.headers).lower()
    assert streamed.request.headers.get("transfer-encoding") == "chunked"
    assert upstream.get_requests() == []


async def test_other_bodies_are_forwarded_unchanged(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{V42}/node/n1", method="POST", json={})
    raw = b'{"state": ["DRAIN"],  "reason": "x"}'
    async with app_client(make_settings(tmp_path, vo_policy())) as client:
        response = await client.post(
            f"{V42}/node/n1", content=raw, headers={**auth(signer, OTHER_VO), "content-type": "text/plain"}
        )
    assert response.status_code == 200
    assert upstream.get_requests()[0].content == raw


async def test_decisions_are_counted_in_the_request_metrics(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{V42}/jobs", json={"jobs": []})
    async with app_session(make_settings(tmp_path, vo_policy())) as (client, state):
        await client.get(f"{V42}/jobs", headers=auth(signer, VO_MEMBER, "garbage", "urn:mace:egi.eu:res:x#y"))
        await client.get(f"{V42}/ping", headers=auth(signer, OTHER_VO))
        await client.post(f"{V42}/job/submit", json={"job": {"reboot": True}}, headers=auth(signer))
        exposition = state["runtime"].metrics.render().decode()
    for labels in (
        'decision="allow",reason="allowed",rule="vo-a",status="200"',
        'decision="deny",reason="operation_not_allowed",rule="",status="403"',
        'decision="deny",reason="job_field_not_allowed",rule="vo-a",status="403"',
    ):
        assert f"slurmproxy_requests_total{{{labels}}} 1.0" in exposition, labels


def caller(*entitlements: str) -> Principal:
    values = entitlements or (VO_MEMBER,)
    return Principal(ISSUER, "alice", {}, values, 0.0, "t", parsed_entitlements=parse_all(values).valid)


def authorizer(tmp_path: Path, policy: dict[str, Any] | None = None) -> Authorizer:
    return Authorizer(load_policy([write_policy(tmp_path, policy or vo_policy())]), max_body_bytes=4096)


async def test_authorizer_reads_no_body_for_an_operation_no_rule_allows(tmp_path: Path) -> None:
    read: list[bool] = []

    async def body() -> bytes:
        read.append(True)
        return b"{}"

    request = PolicyRequest("POST", f"{V42}/job/12", "application/json", "2")
    with pytest.raises(AuthorizationError) as refused:
        await authorizer(tmp_path).authorize(caller(OTHER_VO), request, body)
    assert refused.value.reason == "operation_not_allowed" and refused.value.rule is None
    assert read == []


async def test_authorizer_returns_the_decision_its_policy_and_the_body_to_forward(tmp_path: Path) -> None:
    async def body() -> bytes:
        return json.dumps({"script": "x", "job": {"environment": ENV42}}).encode()

    policy = authorizer(tmp_path)
    authorized = await policy.authorize(caller(), PolicyRequest("POST", f"{V42}/job/submit", "application/json"), body)
    assert authorized.policy is policy.policy and authorized.ref == RuleRef("vo-a", "submit", VO_MEMBER)
    assert authorized.body is not None and json.loads(authorized.body)["job"]["partition"] == "debug"
    plain = await policy.authorize(caller(), PolicyRequest("GET", f"{V42}/jobs"), body)
    assert (plain.operation, plain.body) == ("read-only", None)


async def test_a_refusal_after_the_operation_was_allowed_names_the_rule(tmp_path: Path) -> None:
    async def body() -> bytes:
        return json.dumps({"job": {"environment": ENV42, "partition": "long"}}).encode()

    with pytest.raises(JobPolicyError) as refused:
        await authorizer(tmp_path).authorize(
            caller(), PolicyRequest("POST", f"{V42}/job/submit", "application/json"), body
        )
    assert refused.value.rule == RuleRef("vo-a", "submit", VO_MEMBER)
    limited = vo_policy()
    limited["rules"][0]["rate_limit"] = {"per_identity": {"requests": 1, "period_seconds": 60}}
    policy = authorizer(tmp_path, limited)
    await policy.authorize(caller(), PolicyRequest("GET", f"{V42}/jobs"), body)
    with pytest.raises(RateLimitedError) as limited_error:
        await policy.authorize(caller(), PolicyRequest("GET", f"{V42}/jobs"), body)
    assert limited_error.value.rule == RuleRef("vo-a", "read-only", VO_MEMBER)
    assert limited_error.value.headers["Retry-After"] == "60"


async def test_large_bodies_are_checked_off_the_event_loop_all_the_same(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{V42}/job/submit", method="POST", json={"job_id": 3})
    environment = [f"VAR_{n}={'x' * 40}" for n in range(3000)]  # about 150 KiB, over THREAD_THRESHOLD_BYTES
    async with app_client(make_settings(tmp_path, vo_policy())) as client:
        accepted = await client.post(
            f"{V42}/job/submit", json={"job": {"environment": environment}}, headers=auth(signer)
        )
        refused = await client.post(
            f"{V42}/job/submit", json={"job": {"environment": environment, "account": "x"}}, headers=auth(signer)
        )
    assert accepted.status_code == 200 and refused.status_code == 403
    (sent,) = upstream.get_requests()
    assert len(sent.content) > THREAD_THRESHOLD_BYTES
    assert json.loads(sent.content)["job"]["account"] == "vo-a"
