from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from slurmproxy.core.slurmrest import JobRequest
from slurmproxy.errors import JobPolicyError, UnsupportedMediaTypeError
from slurmproxy.policy import load_policy
from slurmproxy.policy.jobs.decide import check_content_type, decide_job
from tests.helpers import ISSUER, OTHER_VO, VO_MEMBER, principal, write_policy

SUBMIT = "/slurm/v0.0.42/job/submit"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        pytest.param("application/json", True, id="json"),
        pytest.param("Application/JSON; charset=UTF-8", True, id="case-and-charset"),
        pytest.param('application/json;charset="utf-8"', True, id="quoted-charset"),
        pytest.param("application/json; charset=latin-1", False, id="other-charset"),
        pytest.param("application/x-yaml", False, id="yaml"),
        pytest.param("application/x-www-form-urlencoded", False, id="form"),
        pytest.param("text/plain", False, id="text"),
        pytest.param(None, False, id="missing"),
    ],
)
def test_content_type(value: str | None, ok: bool) -> None:
    if ok:
        check_content_type(value)
    else:
        with pytest.raises(UnsupportedMediaTypeError) as err:
            check_content_type(value)
        assert err.value.status_code == 415


def two_vo_policy(tmp_path: Path) -> Any:
    member = VO_MEMBER
    gpu = VO_MEMBER.replace("vo.example.org:", "vo.example.org:gpu:")
    policy = {
        "rules": [
            {
                "id": "vo-a",
                "entitlements": [member],
                "allow": ["submit", "update-own"],
                "mapping": [{"service_account": "svc-a"}],
                "job": {"accounts": ["a"], "partitions": ["debug", "long"]},
            },
            {
                "id": "vo-a-gpu",
                "entitlements": [gpu],
                "allow": ["submit"],
                "mapping": [{"service_account": "svc-gpu"}],
                "job": {"accounts": ["a-gpu", "a"], "partitions": ["gpu"]},
            },
            {
                "id": "vo-b",
                "entitlements": [OTHER_VO],
                "allow": ["submit"],
                "mapping": [{"service_account": "svc-b"}],
                "job": {"accounts": ["b"], "partitions": ["long"]},
            },
        ]
    }
    return load_policy([write_policy(tmp_path, policy)], trusted_issuers=[ISSUER]), gpu


def body(**job: Any) -> bytes:
    return json.dumps({"script": "#!/bin/sh\n", "job": {"environment": ["A=1"], **job}}).encode()


@pytest.mark.parametrize(
    ("entitlements", "job", "rule", "account", "partition"),
    [
        pytest.param(["a"], {}, "vo-a", "a", "debug", id="first-rule-defaults"),
        pytest.param(["a", "gpu"], {"partition": "gpu"}, "vo-a-gpu", "a-gpu", "gpu", id="falls-to-gpu-rule"),
        pytest.param(["a", "gpu"], {}, "vo-a", "a", "debug", id="defaults-from-first-accepting"),
        pytest.param(["a", "b"], {"account": "b"}, "vo-b", "b", "long", id="second-vo-by-account"),
        pytest.param(["a", "b"], {"partition": "long"}, "vo-a", "a", "long", id="both-accept-first-wins"),
    ],
)
def test_the_first_rule_that_accepts_the_body_decides(
    tmp_path: Path, entitlements: list[str], job: dict[str, Any], rule: str, account: str, partition: str
) -> None:
    policy, gpu = two_vo_policy(tmp_path)
    held = [{"a": VO_MEMBER, "b": OTHER_VO, "gpu": gpu}[e] for e in entitlements]
    decided = decide_job(policy, principal(*held), "POST", SUBMIT, JobRequest("submit", "v0.0.42"), body(**job))
    assert decided.decision.rule is not None and decided.decision.rule.id == rule
    sent = json.loads(decided.body)
    assert (sent["job"]["account"], sent["job"]["partition"]) == (account, partition)
    assert sent == decided.document


def test_when_every_rule_refuses_the_first_refusal_is_the_answer(tmp_path: Path) -> None:
    policy, gpu = two_vo_policy(tmp_path)
    with pytest.raises(JobPolicyError) as err:
        decide_job(
            policy, principal(VO_MEMBER, gpu), "POST", SUBMIT, JobRequest("submit", "v0.0.42"), body(account="b")
        )
    assert err.value.field == "job.account" and err.value.reason == "job_account_not_allowed"
    assert err.value.rule_id == "vo-a"
    assert err.value.detail.startswith("rule vo-a: job.account 'b' is not allowed (allowed: a)")
    assert "also refused by rule vo-a-gpu" in err.value.detail


def test_other_vo_cannot_use_this_vo_partition(tmp_path: Path) -> None:
    policy, _ = two_vo_policy(tmp_path)
    with pytest.raises(JobPolicyError) as err:
        decide_job(
            policy, principal(OTHER_VO), "POST", SUBMIT, JobRequest("submit", "v0.0.42"), body(partition="debug")
        )
    assert err.value.field == "job.partition" and "'debug' is not allowed (allowed: long)" in err.value.detail


def test_the_forwarded_body_is_canonical_json(tmp_path: Path) -> None:
    policy, _ = two_vo_policy(tmp_path)
    raw = b'{ "job" : {"environment": ["A=\\u00e9"], "name": "caf\\u00e9"},\n "script": "x" }'
    decided = decide_job(policy, principal(VO_MEMBER), "POST", SUBMIT, JobRequest("submit", "v0.0.42"), raw)
    assert decided.body.isascii() and b" " not in decided.body.replace(b"caf", b"")
    assert json.loads(decided.body)["job"]["name"] == "caf\u00e9"
