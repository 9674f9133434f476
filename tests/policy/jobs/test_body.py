from __future__ import annotations

import json
from typing import Any

import pytest

from slurmproxy.errors import JobBodyError, JobPolicyError
from slurmproxy.policy.jobs.body import parse_job_body
from slurmproxy.policy.jobs.fields import ALLOWED

# The shapes of slurmrestd's v0.0.38 and v0.0.40 OpenAPI schemas.
SAMPLE_38 = {
    "script": "#!/bin/bash\nsrun hostname\n",
    "job": {
        "name": "rest_test",
        "account": "vo_example",
        "partition": "normal",
        "qos": "normal",
        "time_limit": 10,
        "tasks": 1,
        "current_working_directory": "/home/jdoe42",
        "standard_output": "/home/jdoe42/rest_test.%j.out",
        "environment": {"PATH": "/bin:/usr/bin:/usr/local/bin"},
    },
}
SAMPLE_40 = {
    "script": "#!/bin/bash\nsrun hostname\n",
    "job": {
        "name": "rest_test",
        "account": "vo_example",
        "partition": "normal",
        "qos": "normal",
        "time_limit": {"set": True, "infinite": False, "number": 10},
        "tasks": 1,
        "current_working_directory": "/home/jdoe42",
        "standard_output": "/home/jdoe42/rest_test.%j.out",
        "environment": ["PATH=/bin:/usr/bin:/usr/local/bin"],
    },
}
ENV38 = {"PATH": "/bin"}
ENV40 = ["PATH=/bin"]


def raw(data: Any) -> bytes:
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("kind", "dialect", "body", "locations"),
    [
        pytest.param("submit", "v0.0.38", {"script": "s", "job": {"environment": ENV38}}, ["job"], id="38-job"),
        pytest.param(
            "submit",
            "v0.0.38",
            {"script": "s", "jobs": [{"environment": ENV38}] * 2},
            ["jobs[0]", "jobs[1]"],
            id="38-het",
        ),
        pytest.param("submit", "v0.0.40", {"job": {"script": "s", "environment": ENV40}}, ["job"], id="40-job"),
        pytest.param("submit", "v0.0.40", {"script": "s", "job": {"environment": ENV40}}, ["job"], id="40-top-script"),
        pytest.param("submit", "v0.0.40", {"jobs": [{"script": "s"}, {}]}, ["jobs[0]", "jobs[1]"], id="40-het"),
        pytest.param("allocate", "v0.0.40", {"hetjob": [{}, {}]}, ["hetjob[0]", "hetjob[1]"], id="allocate-het"),
        pytest.param("update", "v0.0.38", {"time_limit": 10}, [""], id="38-update"),
        pytest.param("update", "v0.0.40", {"time_limit": {"set": True, "number": 5}}, [""], id="40-update"),
    ],
)
def test_shapes(kind: Any, dialect: Any, body: dict[str, Any], locations: list[str]) -> None:
    job = parse_job_body(kind, dialect, raw(body))
    assert [where for where, _ in job.components] == locations
    assert job.document == body


@pytest.mark.parametrize(
    ("data", "dialect"),
    [pytest.param(SAMPLE_38, "v0.0.38", id="v0.0.38"), pytest.param(SAMPLE_40, "v0.0.40", id="v0.0.40")],
)
def test_reference_samples_parse(data: dict[str, Any], dialect: Any) -> None:
    job = parse_job_body("submit", dialect, raw(data))
    assert job.components[0][1]["account"] == "vo_example"


@pytest.mark.parametrize(
    ("kind", "dialect", "body", "message"),
    [
        pytest.param("submit", "v0.0.38", b"{", "not valid JSON", id="truncated"),
        pytest.param("submit", "v0.0.38", b"\xff\xfe{}", "not UTF-8", id="not-utf8"),
        pytest.param("submit", "v0.0.38", b"[1]", "must be a JSON object", id="array"),
        pytest.param("submit", "v0.0.38", b'{"job": {}, "job": {}}', "twice", id="duplicate-key"),
        pytest.param("submit", "v0.0.38", b'{"job": {"tasks": NaN}}', "not JSON", id="nan"),
        pytest.param("submit", "v0.0.38", b"[" * 100_000 + b"]" * 100_000, "nested too deeply", id="deep"),
        pytest.param("submit", "v0.0.38", raw({"script": "s"}), "exactly one of 'job' and 'jobs'", id="no-job"),
        pytest.param("submit", "v0.0.38", raw({"job": {}, "jobs": [{}]}), "exactly one", id="both"),
        pytest.param("submit", "v0.0.38", raw({"jobs": []}), "1 to 128", id="empty-het"),
        pytest.param("submit", "v0.0.38", raw({"jobs": [{}] * 129}), "1 to 128", id="huge-het"),
        pytest.param("submit", "v0.0.38", raw({"job": [1]}), "job must be a JSON object", id="job-not-object"),
        pytest.param("submit", "v0.0.38", raw({"script": 5, "job": {}}), "script must be a string", id="script-type"),
        pytest.param(
            "submit", "v0.0.38", raw({"job": {"environment": ENV40}}), "environment must be an object", id="38-env-list"
        ),
        pytest.param(
            "submit", "v0.0.40", raw({"job": {"environment": ENV38}}), "a list of strings", id="40-env-object"
        ),
        pytest.param("submit", "v0.0.40", raw({"job": {"environment": ["PATH"]}}), "NAME=value", id="40-env-no-eq"),
        pytest.param(
            "submit", "v0.0.38", raw({"job": {"account": 7}}), "job.account must be a string", id="account-int"
        ),
        pytest.param("submit", "v0.0.38", raw({"job": {"account": "a\x00b"}}), "must be a string", id="nul"),
        pytest.param("submit", "v0.0.38", raw({"job": {"tasks": True}}), "non-negative integer", id="bool-as-int"),
        pytest.param("submit", "v0.0.38", raw({"job": {"tasks": -1}}), "non-negative integer", id="negative"),
        pytest.param("submit", "v0.0.38", raw({"job": {"nodes": [1, 2, 3]}}), "1 to 2 non-negative", id="38-nodes"),
        pytest.param(
            "submit", "v0.0.40", raw({"job": {"time_limit": {"number": 5, "extra": 1}}}), "integer or", id="40-time"
        ),
        pytest.param("submit", "v0.0.40", raw({"job": {"time_limit": "10"}}), "integer or", id="40-time-str"),
        pytest.param("update", "v0.0.38", raw([]), "must be a JSON object", id="update-array"),
    ],
)
def test_bad_bodies_are_400(kind: Any, dialect: Any, body: bytes, message: str) -> None:
    with pytest.raises(JobBodyError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        parse_job_body(kind, dialect, body)
    assert err.value.status_code == 400


@pytest.mark.parametrize(
    ("kind", "dialect", "body", "field"),
    [
        pytest.param("submit", "v0.0.38", {"job": {"user_id": 0}}, "job.user_id", id="38-user-id"),
        pytest.param("submit", "v0.0.40", {"job": {"user_id": "root"}}, "job.user_id", id="40-user-id"),
        pytest.param("submit", "v0.0.40", {"job": {"group_id": "0"}}, "job.group_id", id="group-id"),
        pytest.param("submit", "v0.0.38", {"job": {"User_ID": 0}}, "job.User_ID", id="38-any-case"),
        pytest.param("submit", "v0.0.40", {"jobs": [{}, {"user_id": "x"}]}, "jobs[1].user_id", id="het"),
        pytest.param("submit", "v0.0.40", {"user_id": "x", "job": {}}, "user_id", id="top-level"),
        pytest.param("submit", "v0.0.40", {"job": {}, "extra": 1}, "extra", id="unknown-top-level"),
        pytest.param("update", "v0.0.40", {"user_id": "x"}, "user_id", id="update"),
    ],
)
def test_identity_fields_are_403_whatever_the_rule(kind: Any, dialect: Any, body: dict[str, Any], field: str) -> None:
    with pytest.raises(JobPolicyError) as err:
        parse_job_body(kind, dialect, raw(body))
    assert err.value.status_code == 403 and err.value.field == field
    assert err.value.reason == "job_field_not_allowed"


def test_unknown_fields_are_left_to_the_rule() -> None:
    job = parse_job_body("submit", "v0.0.40", raw({"job": {"burst_buffer": "x", "environment": ENV40}}))
    assert job.components[0][1]["burst_buffer"] == "x"


def test_allow_lists_never_contain_identity_fields() -> None:
    assert "user_id" not in ALLOWED and "group_id" not in ALLOWED
