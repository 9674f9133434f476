"""The differential test: each job body of a corpus goes to slurmrestd directly and through the proxy.

For every API version each generation serves, every body of the corpus (valid ones, edge cases,
invalid ones) is submitted twice as alice: straight to slurmrestd with alice's Slurm token, and
through the proxy, whose rule maps the caller to alice. The outcomes (accepted with a job id, or
refused) must agree, except where the proxy refuses on purpose, and then its answer names the rule
and the field (``slurmproxy.rule``, ``slurmproxy.field``): a rule's limit, a field not allowed or
not in that version, a value in a form the version's OpenAPI document does not give (slurmrestd
converts ``"tasks": "4"`` with only a warning). Nothing the proxy forwards may end differently from
the same body sent directly; ``null`` in particular passes with its meaning, "not set".

The counts (agree, refused by policy, disagree) are printed per version; disagree must be 0. Bodies
that crash a slurmrestd (22.05 on ``argv: null`` and on any non-empty ``argv``) are not sent to it
directly: the direct outcome is "refused".
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from devstack import SlurmCluster
from devstack.provider import MEMBER_ENTITLEMENT, PROXY_AUDIENCE, OidcProvider
from devstack.proxy import ProxyServer
from slurmproxy.policy.jobs.fields import CRASHES_SLURMRESTD
from slurmproxy.policy.jobs.schema import rules_for
from tests.integration.conftest import ProxyFactory, call, proxy_config

RULE = "differential"
ENV38, ENV = {"PATH": "/bin:/usr/bin"}, ["PATH=/bin:/usr/bin"]
JOB_LIMITS = {"partitions": ["debug", "long"], "max_cpus": 2, "max_time": "1-00:00:00"}
Body = dict[str, Any] | list[Any]


@dataclass(frozen=True)
class Case:
    name: str
    job: dict[str, Any] | None = None  # fields over the base job description
    body: Body | None = None  # a whole body instead (then ``job`` is ignored)
    update: bool = False


def _later() -> int:
    return int(time.time()) + 86400


def common_cases() -> list[Case]:
    return [
        Case("minimal", {}),
        Case("name and comment", {"name": "differential", "comment": "a comment"}),
        Case("two tasks", {"tasks": 2}),
        Case("cpus per task", {"cpus_per_task": 2}),
        Case("too many cpus for the rule", {"cpus_per_task": 4}),
        Case("tasks too many for the rule", {"tasks": 3}),
        Case("partition long", {"partition": "long"}),
        Case("partition unknown", {"partition": "no-such-partition"}),
        Case("account null", {"account": None}),
        Case("qos null", {"qos": None}),
        Case("name null", {"name": None}),
        Case("comment null", {"comment": None}),
        Case("partition null", {"partition": None}),
        Case("time limit null", {"time_limit": None}),
        Case("tasks null", {"tasks": None}),
        Case("cpus per task null", {"cpus_per_task": None}),
        Case("memory per node null", {"memory_per_node": None}),
        Case("unknown field", {"no_such_field": 1}),
        Case("priority (privileged)", {"priority": 1}),
        Case("tasks as a string", {"tasks": "2"}),
        Case("tasks not a number", {"tasks": "x"}),
        Case("tasks negative", {"tasks": -1}),
        Case("time limit as a time string", {"time_limit": "1:00:00"}),
        Case("dependency on nothing", {"dependency": "afterok:4000000"}),
        Case("body not an object", body=[]),
        Case("job not an object", body={"script": "#!/bin/sh\ntrue\n", "job": 5}),
        Case("no job", body={"script": "#!/bin/sh\ntrue\n"}),
        Case("array", {"array": "0-3"}),
        Case("array too wide for the rule", {"array": "0-99"}),
        Case("array with a throttle", {"array": "0-99%2"}),
        Case("update time limit", {"time_limit": 10}, update=True),
        Case("update comment", {"comment": "updated"}, update=True),
        Case("update comment null", {"comment": None}, update=True),
        Case("update partition unknown", {"partition": "no-such-partition"}, update=True),
        Case("update tasks (a resource)", {"tasks": 2}, update=True),
    ]


def legacy_cases() -> list[Case]:
    return [
        Case("time limit minutes", {"time_limit": 5}),
        Case("time limit too long for the rule", {"time_limit": 100000}),
        Case("nodes [1, 1]", {"nodes": [1, 1]}),
        Case("nodes [1]", {"nodes": [1]}),
        Case("nodes as a string", {"nodes": "1"}),
        Case("memory per node", {"memory_per_node": 100}),
        Case("memory per cpu", {"memory_per_cpu": 100}),
        Case("exclusive user", {"exclusive": "user"}),
        Case("exclusive true", {"exclusive": "true"}),
        Case("oversubscribe", {"oversubscribe": True}),
        Case("mail type", {"mail_type": "END"}),
        Case("argv", {"argv": ["a", "b"]}),
        Case("argv null (crashes 22.05)", {"argv": None}),
        Case("nice null (22.05: nice 100)", {"nice": None}),
        Case("hold null", {"hold": None}),
        Case("environment as a list", {"environment": ["PATH=/bin:/usr/bin"]}),
        Case("environment null", {"environment": None}),
        Case("gres none", {"gres": "gpu:1"}),
        Case("het job", body={"script": "#!/bin/sh\ntrue\n", "jobs": [{"environment": ENV38}] * 2}),
        Case("script in job", {"script": "#!/bin/sh\ntrue\n"}),
        Case("update time limit minutes", {"time_limit": 15}, update=True),
    ]


def data_parser_cases() -> list[Case]:
    return [
        Case("time limit minutes", {"time_limit": 5}),
        Case("time limit struct", {"time_limit": {"set": True, "infinite": False, "number": 5}}),
        Case("time limit number only", {"time_limit": {"number": 5}}),
        Case("time limit not set", {"time_limit": {"set": False}}),
        Case("time limit infinite", {"time_limit": {"set": True, "infinite": True}}),
        Case("time limit too long for the rule", {"time_limit": 100000}),
        Case("nodes 1", {"nodes": "1"}),
        Case("nodes 1-1", {"nodes": "1-1"}),
        Case("nodes as an integer", {"nodes": 1}),
        Case("nodes garbage", {"nodes": "1-x"}),
        Case("nodes null", {"nodes": None}),
        Case("minimum and maximum nodes", {"minimum_nodes": 1, "maximum_nodes": 1}),
        Case("memory per node", {"memory_per_node": 100}),
        Case("memory per node struct", {"memory_per_node": {"set": True, "number": 100}}),
        Case("memory per cpu struct", {"memory_per_cpu": {"set": True, "infinite": False, "number": 100}}),
        Case("mail type list", {"mail_type": ["END", "FAIL"]}),
        Case("mail type one string", {"mail_type": "END"}),
        Case("mail type comma string", {"mail_type": "END,FAIL"}),
        Case("mail type null", {"mail_type": None}),
        Case("shared user", {"shared": ["user"]}),
        Case("shared none (whole node)", {"shared": ["none"]}),
        Case("exclusive user", {"exclusive": ["user"]}),
        Case("oversubscribe true", {"oversubscribe": True}),
        Case("required nodes", {"required_nodes": ["localhost"]}),
        Case("required nodes as a string", {"required_nodes": "localhost"}),
        Case("excluded nodes empty", {"excluded_nodes": []}),
        Case("argv", {"argv": ["a", "b"]}),
        Case("argv null", {"argv": None}),
        Case("argv as a string", {"argv": "a"}),
        Case("environment as an object", {"environment": {"PATH": "/bin:/usr/bin"}}),
        Case("environment null", {"environment": None}),
        Case("begin time struct", {"begin_time": {"set": True, "number": _later()}}),
        Case("begin time null", {"begin_time": None}),
        Case("hold as an integer", {"hold": 1}),
        Case("hold null", {"hold": None}),
        Case("requeue null", {"requeue": None}),
        Case("tres per task cpu", {"tres_per_task": "cpu=1"}),
        Case("tres per task cpu too many", {"tres_per_task": "cpu=4"}),
        Case("tres per job gpu (none here)", {"tres_per_job": "gres/gpu:1"}),
        Case("threads per core", {"threads_per_core": 1}),
        Case("script in job", body={"job": {"script": "#!/bin/sh\ntrue\n", "hold": True, "environment": ENV}}),
        Case("script null at the top", body={"script": None, "job": {"hold": True, "environment": ENV}}),
        Case("het job", body={"script": "#!/bin/sh\ntrue\n", "jobs": [{"hold": True, "environment": ENV}] * 2}),
        Case("update time limit struct", {"time_limit": {"set": True, "number": 15}}, update=True),
        Case("update time limit null", {"time_limit": None}, update=True),
        Case("update nodes (a resource)", {"maximum_nodes": 1}, update=True),
    ]


def corpus(version: str) -> list[Case]:
    return common_cases() + (legacy_cases() if version == "v0.0.38" else data_parser_cases())


@pytest.fixture(scope="module")
def differential_proxy(slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory) -> ProxyServer:
    policy = {
        "rules": [
            {
                "id": RULE,
                "entitlements": [MEMBER_ENTITLEMENT],
                "allow": ["read-only", "submit", "update-own", "cancel-own"],
                "mapping": [{"table": "users"}],
                "job": JOB_LIMITS,
            }
        ],
        "tables": {"users": {"entries": [{"issuer": oidc.issuer, "subject": "alice", "user": "alice"}]}},
    }
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    return proxy_factory(proxy_config(slurm, [issuer]), {"differential.yaml": policy})


class Direct:
    """slurmrestd itself, as alice."""

    def __init__(self, slurm: SlurmCluster) -> None:
        self.slurm = slurm
        self.headers = {"X-SLURM-USER-NAME": "alice", "X-SLURM-USER-TOKEN": slurm.mint_token("alice", 1800)}

    def post(self, path: str, body: Body) -> httpx.Response:
        return httpx.post(self.slurm.url + path, json=body, headers=self.headers, timeout=60)


def full_body(version: str, case: Case, directory: str) -> Body:
    if case.body is not None:
        return case.body
    environment: Any = {"PATH": "/bin:/usr/bin"} if version == "v0.0.38" else ["PATH=/bin:/usr/bin"]
    base = {
        "name": "differential",
        "current_working_directory": directory,
        "standard_output": "/dev/null",
        "environment": environment,
        "hold": True,
    }
    job = {**base, **(case.job or {})}
    return job if case.update else {"script": "#!/bin/sh\ntrue\n", "job": job}


def accepted(response: httpx.Response, update: bool) -> bool:
    try:
        data = response.json()
    except ValueError:
        return False
    if response.status_code != 200 or not isinstance(data, dict):
        return False
    return not data.get("errors") if update else bool(data.get("job_id"))


def crashes_slurmrestd(version: str, case: Case) -> bool:
    """Known to crash that version's slurmrestd: null in the committed rules, values in CRASHES_SLURMRESTD."""
    rules = rules_for(version)
    fields = case.job or {}
    if any(value and key in CRASHES_SLURMRESTD.get(version, {}) for key, value in fields.items()):
        return True
    return any(value is None and rules.null.get(key) == "crashes" for key, value in fields.items())


@dataclass
class Tally:
    counts: Counter[str]
    disagreements: list[str]
    submitted: list[int]


def run_case(
    version: str, case: Case, direct: Direct, proxy: ProxyServer, token: str, held_job: int, tally: Tally
) -> None:
    path = f"/slurm/{version}/job/{held_job}" if case.update else f"/slurm/{version}/job/submit"
    body = full_body(version, case, str(direct.slurm.job_dir("alice")))
    if crashes_slurmrestd(version, case):
        direct_ok = False
    else:
        answer = direct.post(path, body)
        direct_ok = accepted(answer, case.update)
        if direct_ok and not case.update:
            tally.submitted.append(int(answer.json()["job_id"]))
    through = call(proxy, "POST", path, token=token, json=body)
    proxy_ok = accepted(through, case.update)
    if proxy_ok and not case.update:
        tally.submitted.append(int(through.json()["job_id"]))
    if proxy_ok == direct_ok:
        tally.counts["agree"] += 1
        return
    own = (
        through.json().get("slurmproxy", {})
        if through.headers.get("content-type", "").startswith("application/json")
        else {}
    )
    if not proxy_ok and own.get("rule") == RULE and own.get("field"):
        tally.counts["refused by policy"] += 1
        return
    tally.counts["disagree"] += 1
    tally.disagreements.append(
        f"{version} {case.name}: direct {'accepted' if direct_ok else 'refused'}, "
        f"proxy {through.status_code} {through.text[:300]}"
    )


@pytest.fixture
def held_job(slurm: SlurmCluster) -> Iterator[int]:
    """alice's held job, for the update cases (submitted directly, in every version's shape)."""
    direct = Direct(slurm)
    version = slurm.api_versions[-1]
    environment: Any = {"PATH": "/bin"} if version == "v0.0.38" else ["PATH=/bin"]
    job = {"hold": True, "environment": environment, "standard_output": "/dev/null", "name": "differential-held"}
    body = {"script": "#!/bin/sh\ntrue\n", "job": {**job, "current_working_directory": str(slurm.job_dir("alice"))}}
    answer = direct.post(f"/slurm/{version}/job/submit", body)
    assert answer.status_code == 200, answer.text
    job_id = int(answer.json()["job_id"])
    yield job_id
    slurm.slurm_cmd(["scancel", str(job_id)], check=False)


def test_job_bodies_end_the_same_directly_and_through_the_proxy(
    differential_proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, held_job: int
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    direct = Direct(slurm)
    report = []
    tally = Tally(Counter(), [], [])
    try:
        for version in slurm.api_versions:
            before = Counter(tally.counts)
            for case in corpus(version):
                run_case(version, case, direct, differential_proxy, token, held_job, tally)
            mine = tally.counts - before
            report.append(
                f"{version}: {sum(mine.values())} bodies, "
                + ", ".join(f"{k} {mine[k]}" for k in ("agree", "refused by policy", "disagree"))
            )
    finally:
        for start in range(0, len(tally.submitted), 200):
            slurm.slurm_cmd(["scancel", *map(str, tally.submitted[start : start + 200])], check=False)
    print(f"\ndifferential, Slurm {slurm.generation}:\n  " + "\n  ".join(report))
    print(f"  total: {dict(tally.counts)}")
    assert tally.disagreements == [], "\n".join(tally.disagreements)
    assert tally.counts["agree"] and tally.counts["refused by policy"]
    # the session's slurmrestd is still there (no body sent to it crashed it)
    assert direct.post(f"/slurm/{slurm.api_versions[-1]}/job/{held_job}", {"comment": "still up"}).status_code == 200
