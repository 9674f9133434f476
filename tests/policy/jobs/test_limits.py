from __future__ import annotations

import json
from typing import Any

import pytest

from slurmproxy.errors import JobPolicyError
from slurmproxy.policy.jobs.body import parse_job_body
from slurmproxy.policy.jobs.limits import apply_limits
from slurmproxy.policy.limits import JobLimits

ENV38 = {"PATH": "/bin"}
ENV40 = ["PATH=/bin"]
VO_A = JobLimits(
    accounts=frozenset({"vo-a", "vo-a-extra"}),
    default_account="vo-a",
    partitions=frozenset({"debug", "long"}),
    default_partition="debug",
    qos=frozenset({"normal"}),
    default_qos="normal",
    max_minutes=120,
    default_minutes=30,
    max_nodes=2,
    max_cpus=8,
)


def job38(**fields: Any) -> dict[str, Any]:
    return {"script": "#!/bin/bash\n", "job": {"environment": ENV38, **fields}}


def job40(**fields: Any) -> dict[str, Any]:
    return {"job": {"script": "#!/bin/bash\n", "environment": ENV40, **fields}}


def apply(
    body: dict[str, Any], limits: JobLimits | None = VO_A, *, dialect: Any = "v0.0.40", kind: Any = "submit"
) -> dict[str, Any]:
    return apply_limits(parse_job_body(kind, dialect, json.dumps(body).encode()), limits)


@pytest.mark.parametrize(
    ("body", "dialect", "filled"),
    [
        pytest.param(
            job38(),
            "v0.0.38",
            {"account": "vo-a", "partition": "debug", "qos": "normal", "time_limit": 30, "nodes": [1, 2]},
            id="38-all-defaults",
        ),
        pytest.param(
            job40(),
            "v0.0.40",
            {
                "account": "vo-a",
                "partition": "debug",
                "qos": "normal",
                "time_limit": {"set": True, "infinite": False, "number": 30},
                "maximum_nodes": 2,
            },
            id="40-all-defaults",
        ),
        pytest.param(
            job38(account="vo-a-extra", partition="long", time_limit=120, nodes=[2]),
            "v0.0.38",
            {"account": "vo-a-extra", "partition": "long", "qos": "normal", "time_limit": 120, "nodes": [2]},
            id="38-explicit-values-kept",
        ),
        pytest.param(
            job40(partition="debug,long", time_limit=60, nodes="1-2"),
            "v0.0.40",
            {"account": "vo-a", "partition": "debug,long", "qos": "normal", "time_limit": 60, "nodes": "1-2"},
            id="40-partition-list-plain-int-time",
        ),
        pytest.param(
            job40(time_limit={"set": False, "number": 0}),
            "v0.0.40",
            {"time_limit": {"set": True, "infinite": False, "number": 30}},
            id="40-unset-time-gets-default",
        ),
        pytest.param(
            job40(minimum_nodes=2),
            "v0.0.40",
            {"minimum_nodes": 2, "maximum_nodes": 2},
            id="40-minimum-nodes-gets-maximum",
        ),
    ],
)
def test_defaults_are_filled_and_allowed_values_kept(
    body: dict[str, Any], dialect: Any, filled: dict[str, Any]
) -> None:
    before = json.loads(json.dumps(body))
    out = apply(body, dialect=dialect)
    assert {k: out["job"][k] for k in filled} == filled
    assert out["job"]["environment"] == body["job"]["environment"]
    assert body == before  # the parsed body is never modified


@pytest.mark.parametrize(
    ("body", "dialect", "field", "reason"),
    [
        pytest.param(job38(account="vo-b"), "v0.0.38", "job.account", "job_account_not_allowed", id="38-account"),
        pytest.param(job40(account="vo-b"), "v0.0.40", "job.account", "job_account_not_allowed", id="40-account"),
        pytest.param(job40(account="VO-A"), "v0.0.40", "job.account", "job_account_not_allowed", id="case"),
        pytest.param(job38(partition="gpu"), "v0.0.38", "job.partition", "job_partition_not_allowed", id="partition"),
        pytest.param(
            job40(partition="debug,gpu"), "v0.0.40", "job.partition", "job_partition_not_allowed", id="part-list"
        ),
        pytest.param(job40(qos="high"), "v0.0.40", "job.qos", "job_qos_not_allowed", id="qos"),
        pytest.param(job38(time_limit=121), "v0.0.38", "job.time_limit", "job_time_limit_exceeded", id="38-time"),
        pytest.param(
            job40(time_limit={"set": True, "number": 121}),
            "v0.0.40",
            "job.time_limit",
            "job_time_limit_exceeded",
            id="40-time-struct",
        ),
        pytest.param(
            job40(time_limit={"infinite": True}), "v0.0.40", "job.time_limit", "job_time_limit_exceeded", id="inf"
        ),
        pytest.param(job38(time_limit=4294967294), "v0.0.38", "job.time_limit", "job_time_limit_exceeded", id="38-inf"),
        pytest.param(job40(time_minimum=500), "v0.0.40", "job.time_minimum", "job_time_limit_exceeded", id="min"),
        pytest.param(job38(nodes=[1, 3]), "v0.0.38", "job.nodes", "job_nodes_exceeded", id="38-nodes"),
        pytest.param(job40(nodes="4"), "v0.0.40", "job.nodes", "job_nodes_exceeded", id="40-nodes"),
        pytest.param(job40(nodes="1,3"), "v0.0.40", "job.nodes", "job_nodes_exceeded", id="40-node-list"),
        pytest.param(job40(maximum_nodes=3), "v0.0.40", "job.nodes", "job_nodes_exceeded", id="40-max-nodes"),
        pytest.param(job40(minimum_nodes=3), "v0.0.40", "job.nodes", "job_nodes_exceeded", id="40-min-nodes"),
        pytest.param(job40(tasks=9), "v0.0.40", "job.tasks", "job_cpus_exceeded", id="tasks"),
        pytest.param(job38(tasks=3, cpus_per_task=3), "v0.0.38", "job.tasks", "job_cpus_exceeded", id="tasks-x-cpus"),
        pytest.param(job40(minimum_cpus=9), "v0.0.40", "job.tasks", "job_cpus_exceeded", id="minimum-cpus"),
        pytest.param(job40(tasks_per_node=5, nodes="2"), "v0.0.40", "job.tasks", "job_cpus_exceeded", id="per-node"),
        pytest.param(job40(burst_buffer="x"), "v0.0.40", "job.burst_buffer", "job_field_not_allowed", id="unknown"),
        pytest.param(job38(script="x"), "v0.0.38", "job.script", "job_field_not_in_version", id="38-script-in-job"),
        pytest.param(job40(Account="vo-b"), "v0.0.40", "job.Account", "job_field_not_allowed", id="key-case"),
        pytest.param(job40(priority=1), "v0.0.40", "job.priority", "job_field_not_allowed", id="priority"),
    ],
)
def test_refusals_name_the_field(body: dict[str, Any], dialect: Any, field: str, reason: str) -> None:
    with pytest.raises(JobPolicyError) as err:
        apply(body, dialect=dialect)
    assert (err.value.field, err.value.reason, err.value.status_code) == (field, reason, 403)
    assert field.split(".")[-1] in err.value.detail or "nodes" in err.value.detail or "CPUs" in err.value.detail


def test_het_job_components_are_each_checked_and_filled() -> None:
    body = {"jobs": [{"script": "x", "environment": ENV40}, {"environment": ENV40, "partition": "long"}]}
    out = apply(body)
    assert [c["partition"] for c in out["jobs"]] == ["debug", "long"]
    assert [c["account"] for c in out["jobs"]] == ["vo-a", "vo-a"]
    with pytest.raises(JobPolicyError) as err:
        apply({"jobs": [{"environment": ENV40}, {"environment": ENV40, "account": "vo-b"}]})
    assert err.value.field == "jobs[1].account"


def test_het_job_nodes_and_cpus_are_summed() -> None:
    limits = JobLimits(max_nodes=3, max_cpus=6)
    assert apply({"jobs": [{"nodes": "1"}, {"nodes": "2"}]}, limits)
    with pytest.raises(JobPolicyError) as err:
        apply({"jobs": [{"nodes": "2"}, {"nodes": "2"}]}, limits)
    assert (err.value.field, err.value.reason) == ("jobs[1].nodes", "job_nodes_exceeded")
    with pytest.raises(JobPolicyError) as err:
        apply({"jobs": [{"tasks": 4}, {"tasks": 3}]}, limits)
    assert (err.value.field, err.value.reason) == ("jobs[1].tasks", "job_cpus_exceeded")


@pytest.mark.parametrize(
    ("body", "dialect"),
    [
        pytest.param({"partition": "long", "time_limit": 100}, "v0.0.38", id="38"),
        pytest.param({"partition": "long", "time_limit": {"set": True, "number": 100}}, "v0.0.40", id="40"),
        pytest.param({"comment": "hello"}, "v0.0.40", id="nothing-restricted"),
    ],
)
def test_updates_are_checked_but_never_filled(body: dict[str, Any], dialect: Any) -> None:
    assert apply(body, dialect=dialect, kind="update") == body


def test_update_to_a_forbidden_partition_is_refused() -> None:
    with pytest.raises(JobPolicyError) as err:
        apply({"partition": "gpu"}, kind="update")
    assert err.value.field == "partition" and err.value.reason == "job_partition_not_allowed"


def test_without_limits_only_the_field_allow_list_applies() -> None:
    body = job40(account="anything", partition="anywhere", time_limit=99999, tasks=1000)
    assert apply(body, None) == body
    with pytest.raises(JobPolicyError):
        apply(job40(reboot=True), None)


def test_extra_fields_allow_more_fields_for_one_rule() -> None:
    limits = JobLimits(extra_fields=frozenset({"burst_buffer"}))
    assert apply(job40(burst_buffer="x"), limits)["job"]["burst_buffer"] == "x"
    with pytest.raises(JobPolicyError):
        apply(job40(burst_buffer="x"), JobLimits())
