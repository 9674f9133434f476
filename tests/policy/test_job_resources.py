"""Job limits that could be exceeded (issue 15, item 3) and JSON as slurmrestd takes it (issue 17).

Driven through the in-process app and a fake slurmrestd, so each test says what reaches Slurm.
Under a rule with ``max_cpus: 4, max_nodes: 1`` the proxy used to forward whole-node requests,
GPUs with CPUs or tasks per GPU, ``tres_per_task: cpu=128``, arrays of 100,000 tasks and any
memory, and checked updates on their own values; and it refused ``null`` for optional fields that
slurmrestd takes as "not set".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pytest_httpx import HTTPXMock

from tests.asgi import app_client
from tests.fakeupstream import ThreadedFakeSlurmrestd as Upstream
from tests.helpers import UPSTREAM, VO_MEMBER, Signer, make_settings

pytestmark = pytest.mark.anyio
ENV38, ENV42 = {"PATH": "/bin"}, ["PATH=/bin"]
LIMITS = {"max_cpus": 4, "max_nodes": 1}


def policy(**job: Any) -> dict[str, Any]:
    return {
        "rules": [
            {
                "id": "small-jobs",
                "entitlements": [VO_MEMBER],
                "allow": ["submit", "update-own"],
                "mapping": [{"service_account": "svc-alpha"}],
                "job": job,
            }
        ]
    }


def auth(signer: Signer) -> dict[str, str]:
    return {"Authorization": f"Bearer {signer.token(eduperson_entitlement=[VO_MEMBER])}"}


def submit_body(version: str, **job: Any) -> dict[str, Any]:
    return {"script": "#!/bin/sh\n", "job": {"environment": ENV38 if version == "v0.0.38" else ENV42, **job}}


async def refused(tmp_path: Path, signer: Signer, version: str, path: str, body: Any, **job: Any) -> dict[str, Any]:
    async with app_client(make_settings(tmp_path, policy(**(job or LIMITS)))) as client:
        response = await client.post(f"/slurm/{version}/{path}", json=body, headers=auth(signer))
    assert response.status_code in (400, 403), response.text
    answer: dict[str, Any] = response.json()["slurmproxy"]
    assert answer["rule"] == "small-jobs", answer
    return answer


async def forwarded(
    tmp_path: Path, signer: Signer, upstream: Upstream, version: str, body: Any, **job: Any
) -> dict[str, Any]:
    upstream.add_response(url=f"{UPSTREAM}/slurm/{version}/job/submit", method="POST", json={"job_id": 7})
    async with app_client(make_settings(tmp_path, policy(**job))) as client:
        response = await client.post(f"/slurm/{version}/job/submit", json=body, headers=auth(signer))
    assert response.status_code == 200, response.text
    (sent,) = upstream.get_requests()
    document: dict[str, Any] = json.loads(sent.content)
    return document


@pytest.mark.parametrize(
    ("version", "job", "field", "reason"),
    [
        # whole nodes: every CPU of the node, whatever the job counts (measured on 24.11 and 26.05)
        pytest.param("v0.0.40", {"exclusive": ["true"]}, "job.exclusive", "job_resources_uncountable", id="exclusive"),
        pytest.param("v0.0.42", {"shared": ["none"]}, "job.shared", "job_resources_uncountable", id="shared-none"),
        pytest.param("v0.0.45", {"shared": "none"}, "job.shared", "job_resources_uncountable", id="shared-string"),
        pytest.param(
            "v0.0.41", {"oversubscribe": False}, "job.oversubscribe", "job_resources_uncountable", id="no-oversub"
        ),
        pytest.param("v0.0.38", {"exclusive": "true"}, "job.exclusive", "job_resources_uncountable", id="38-exclusive"),
        # GPUs that bring CPUs or tasks with them
        pytest.param(
            "v0.0.42",
            {"tres_per_job": "gres/gpu:4", "cpus_per_tres": "gres/gpu:32"},
            "job.tasks",
            "job_cpus_exceeded",
            id="cpus-per-tres",
        ),
        pytest.param(
            "v0.0.38", {"gpus": "4", "cpus_per_gpu": "32"}, "job.tasks", "job_cpus_exceeded", id="cpus-per-gpu"
        ),
        pytest.param(
            "v0.0.42",
            {"tres_per_job": "gres/gpu:2", "ntasks_per_tres": 64},
            "job.tasks",
            "job_cpus_exceeded",
            id="ntasks-per-tres",
        ),
        pytest.param("v0.0.42", {"tres_per_task": "cpu=128"}, "job.tasks", "job_cpus_exceeded", id="tres-per-task-cpu"),
        pytest.param(
            "v0.0.45", {"tres_per_task": "cpu:128"}, "job.tasks", "job_cpus_exceeded", id="tres-per-task-colon"
        ),
        pytest.param(
            "v0.0.42", {"tres_per_node": "cpu:8"}, "job.tres_per_node", "job_resources_uncountable", id="tres-cpu"
        ),
        pytest.param(
            "v0.0.42", {"tres_per_job": "license/x:1"}, "job.tres_per_job", "job_resources_uncountable", id="tres-?"
        ),
        pytest.param(
            "v0.0.42", {"threads_per_core": 1}, "job.threads_per_core", "job_resources_uncountable", id="threads"
        ),
        # arrays: each task that may run at once counts
        pytest.param("v0.0.42", {"array": "0-99999"}, "job.array", "job_nodes_exceeded", id="array"),
        pytest.param("v0.0.38", {"array": "1-100000"}, "job.array", "job_nodes_exceeded", id="38-array"),
        pytest.param("v0.0.42", {"array": "1-3,x"}, "job.array", "job_resources_uncountable", id="array-garbage"),
        # nodes named one by one
        pytest.param("v0.0.42", {"required_nodes": ["n[1-3]"]}, "job.nodes", "job_nodes_exceeded", id="required-nodes"),
        pytest.param("v0.0.42", {"nodes": "1-x"}, "job.nodes", "job_resources_uncountable", id="nodes-garbage"),
    ],
)
async def test_fields_that_add_cpus_or_nodes_are_counted_or_refused(
    tmp_path: Path,
    httpx_mock: HTTPXMock,
    signer: Signer,
    upstream: Upstream,
    version: str,
    job: Any,
    field: str,
    reason: str,
) -> None:
    answer = await refused(tmp_path, signer, version, "job/submit", submit_body(version, **job))
    assert (answer["reason"], answer["field"]) == (reason, field)
    assert upstream.get_requests() == []


@pytest.mark.parametrize(
    ("version", "job", "limits", "field", "reason"),
    [
        pytest.param(
            "v0.0.42", {"tres_per_node": "gres/gpu:2"}, {"max_gpus": 1}, "job.gpus", "job_gpus_exceeded", id="per-node"
        ),
        pytest.param(
            "v0.0.42",
            {"tres_per_task": "gres/gpu:1", "tasks": 2},
            {"max_gpus": 1},
            "job.gpus",
            "job_gpus_exceeded",
            id="per-task",
        ),
        pytest.param(
            "v0.0.38", {"gres": "gpu:tesla:2"}, {"max_gpus": 1}, "job.gpus", "job_gpus_exceeded", id="38-gres"
        ),
        pytest.param(
            "v0.0.38",
            {"gpus_per_task": "1", "tasks": 4},
            {"max_gpus": 2},
            "job.gpus",
            "job_gpus_exceeded",
            id="38-per-task",
        ),
        pytest.param(
            "v0.0.42",
            {"tres_per_socket": "gres/gpu:1"},
            {"max_gpus": 8},
            "job.tres_per_socket",
            "job_resources_uncountable",
            id="per-socket",
        ),
        pytest.param(
            "v0.0.42",
            {"memory_per_node": 1_000_000},
            {"max_memory": "4G"},
            "job.memory_per_node",
            "job_memory_exceeded",
            id="memory",
        ),
        pytest.param(
            "v0.0.45",
            {"memory_per_cpu": {"set": True, "number": 2048}, "tasks": 4},
            {"max_memory": "4G"},
            "job.memory_per_node",
            "job_memory_exceeded",
            id="memory-per-cpu",
        ),
        pytest.param(
            "v0.0.42",
            {"memory_per_node": 0},
            {"max_memory": 4096},
            "job.memory_per_node",
            "job_resources_uncountable",
            id="all-memory",
        ),
        pytest.param(
            "v0.0.42",
            {"memory_per_node": {"infinite": True}},
            {"max_memory": 4096},
            "job.memory_per_node",
            "job_resources_uncountable",
            id="infinite-memory",
        ),
        pytest.param(
            "v0.0.42",
            {"tres_per_job": "gres/gpu:2", "memory_per_tres": "gres/gpu:4096"},
            {"max_memory": "4G"},
            "job.memory_per_node",
            "job_memory_exceeded",
            id="memory-per-gpu",
        ),
        pytest.param(
            "v0.0.38",
            {"memory_per_node": 8192},
            {"max_memory": "4G"},
            "job.memory_per_node",
            "job_memory_exceeded",
            id="38-memory",
        ),
        pytest.param(
            "v0.0.42",
            {"array": "0-99999%2"},
            {"max_array_tasks": 1000},
            "job.array",
            "job_array_tasks_exceeded",
            id="array-tasks",
        ),
    ],
)
async def test_gpu_memory_and_array_limits(
    tmp_path: Path,
    httpx_mock: HTTPXMock,
    signer: Signer,
    upstream: Upstream,
    version: str,
    job: Any,
    limits: dict[str, Any],
    field: str,
    reason: str,
) -> None:
    answer = await refused(tmp_path, signer, version, "job/submit", submit_body(version, **job), **limits)
    assert (answer["reason"], answer["field"]) == (reason, field)
    assert upstream.get_requests() == []


async def test_what_fits_is_forwarded_with_memory_and_node_bounds_filled(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    job = {"tres_per_node": "gres/gpu:1", "cpus_per_tres": "gres/gpu:2", "array": "0-99%2"}
    sent = await forwarded(
        tmp_path, signer, upstream, "v0.0.42", submit_body("v0.0.42", **job), max_cpus=4, max_gpus=2, max_memory="8G"
    )
    # two tasks at once, one node each, one GPU and two CPUs each; 8G spread over what may run at once
    assert sent["job"]["maximum_nodes"] == 1
    assert sent["job"]["memory_per_node"] == {"set": True, "infinite": False, "number": 4096}


async def test_default_memory_is_filled_in_v0_0_38(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    body = submit_body("v0.0.38", nodes=[2, 2])
    sent = await forwarded(tmp_path, signer, upstream, "v0.0.38", body, max_memory="8G", default_memory="2G")
    assert (sent["job"]["memory_per_node"], sent["job"]["nodes"]) == (1024, [2, 2])


@pytest.mark.parametrize(
    ("version", "update"),
    [
        pytest.param("v0.0.42", {"tasks": 4}, id="tasks"),
        pytest.param("v0.0.42", {"cpus_per_task": 4}, id="cpus-per-task"),
        pytest.param("v0.0.38", {"cpus_per_task": 2}, id="38-cpus-per-task"),
        pytest.param("v0.0.42", {"maximum_nodes": 1}, id="nodes"),
        pytest.param("v0.0.42", {"memory_per_node": 10}, id="memory"),
    ],
)
async def test_updates_may_not_change_resources_under_a_limiting_rule(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream, version: str, update: dict[str, Any]
) -> None:
    """A job submitted with 4 tasks of one CPU, updated to 4 CPUs per task, would hold 16 CPUs."""
    answer = await refused(tmp_path, signer, version, "job/12", update)
    assert answer["reason"] == "job_update_changes_resources" and answer["field"] == next(iter(update))
    assert upstream.get_requests() == []


async def test_time_updates_are_still_checked_on_their_value(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.42/job/12", method="POST", json={})
    async with app_client(make_settings(tmp_path, policy(max_time=60, **LIMITS))) as client:
        fine = await client.post("/slurm/v0.0.42/job/12", json={"time_limit": 30}, headers=auth(signer))
        long = await client.post("/slurm/v0.0.42/job/12", json={"time_limit": 61}, headers=auth(signer))
    assert fine.status_code == 200 and long.status_code == 403
    assert long.json()["slurmproxy"]["reason"] == "job_time_limit_exceeded"


# --- null, as slurmrestd takes it (issue 17) -------------------------------------------------------------


async def test_null_for_optional_fields_means_not_set(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    body = submit_body("v0.0.42", partition=None, account=None, qos=None, time_limit=None, tasks=None, name="n")
    sent = await forwarded(tmp_path, signer, upstream, "v0.0.42", body)
    # 24.11 reads tasks: null as 0 tasks (measured): the proxy forwards what null means, not set
    assert sent["job"] == {"environment": ENV42, "name": "n"}


async def test_null_is_not_set_for_the_rules_defaults_too(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    body = submit_body("v0.0.45", partition=None, account=None, time_limit=None)
    sent = await forwarded(
        tmp_path, signer, upstream, "v0.0.45", body, partitions=["debug"], accounts=["vo-a"], max_time=30
    )
    assert (sent["job"]["partition"], sent["job"]["account"]) == ("debug", "vo-a")
    assert sent["job"]["time_limit"] == {"set": True, "infinite": False, "number": 30}


@pytest.mark.parametrize(
    ("version", "field"),
    [
        pytest.param("v0.0.38", "partition", id="38-partition"),  # 22.05: "Invalid partition name specified"
        pytest.param("v0.0.38", "argv", id="38-argv"),  # 22.05's slurmrestd crashes on it
        pytest.param("v0.0.42", "nodes", id="42-nodes"),  # 500 "Unable to convert Data type"
        pytest.param("v0.0.45", "mail_type", id="45-flags"),  # 500 "Data parser expects flags to be a list"
    ],
)
async def test_null_that_slurmrestd_refuses_is_400_naming_the_field(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream, version: str, field: str
) -> None:
    answer = await refused(tmp_path, signer, version, "job/submit", submit_body(version, **{field: None}), max_time=9)
    assert (answer["status"], answer["reason"], answer["field"]) == (400, "bad_job_body", f"job.{field}")
    assert upstream.get_requests() == []


async def test_fields_a_version_does_not_have_are_refused(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    """v0.0.42 dropped ``exclusive``: slurmrestd would ignore it with a warning and run a shared job."""
    answer = await refused(tmp_path, signer, "v0.0.42", "job/submit", submit_body("v0.0.42", exclusive=["user"]))
    assert (answer["reason"], answer["field"]) == ("job_field_not_in_version", "job.exclusive")


@pytest.mark.parametrize(
    ("job", "field"),
    [
        pytest.param({"tasks": "128"}, "job.tasks", id="string-as-integer"),  # slurmrestd: 128 tasks, a warning
        pytest.param({"tasks": 2.5}, "job.tasks", id="float"),
        pytest.param({"hold": 1}, "job.hold", id="integer-as-boolean"),
        pytest.param({"environment": ENV38}, "job.environment", id="object-as-list"),
        pytest.param({"mail_type": "END,FAIL"}, "job.mail_type", id="flags-csv"),
    ],
)
async def test_forms_outside_the_document_are_refused_before_any_rule(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream, job: Any, field: str
) -> None:
    answer = await refused(tmp_path, signer, "v0.0.42", "job/submit", submit_body("v0.0.42", **job))
    assert (answer["status"], answer["field"]) == (400, field)


async def test_documented_forms_pass(tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream) -> None:
    job = {
        "time_limit": 5,
        "memory_per_node": {"set": True, "number": 100},
        "mail_type": "END",  # one flag as a string: slurmrestd takes it without a warning
        "shared": ["user"],
        "required_nodes": ["localhost"],
        "begin_time": {"set": False},
    }
    sent = await forwarded(tmp_path, signer, upstream, "v0.0.45", submit_body("v0.0.45", **job), **LIMITS)
    assert {k: sent["job"][k] for k in job} == job


async def test_an_array_counts_the_cpus_of_every_task_that_may_run_at_once(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    body = submit_body("v0.0.42", array="0-99999")
    answer = await refused(tmp_path, signer, "v0.0.42", "job/submit", body, max_cpus=4)
    assert (answer["reason"], answer["field"]) == ("job_cpus_exceeded", "job.array")
    sent = await forwarded(tmp_path, signer, upstream, "v0.0.42", submit_body("v0.0.42", array="0-99999%4"), max_cpus=4)
    assert sent["job"]["array"] == "0-99999%4"


async def test_argv_is_not_forwarded_to_v0_0_38_whose_slurmrestd_crashes_on_it(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    answer = await refused(tmp_path, signer, "v0.0.38", "job/submit", submit_body("v0.0.38", argv=["a"]), max_time=9)
    assert (answer["status"], answer["reason"], answer["field"]) == (403, "job_field_unsafe", "job.argv")
    assert upstream.get_requests() == []
