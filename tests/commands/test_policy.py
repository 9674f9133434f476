"""``slurmproxy policy check`` and ``slurmproxy policy explain``, run through the CLI's main()."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from slurmproxy.cli import main
from slurmproxy.identity.pool import LeaseStore
from tests.helpers import ISSUER, OTHER_VO, VO_MEMBER, make_settings

ROOT = Path(__file__).resolve().parents[2]


def site_policy() -> dict[str, Any]:
    return {
        "rules": [
            {
                "id": "vo-a",
                "entitlements": [VO_MEMBER],
                "allow": ["ping", "submit"],
                "mapping": [{"table": "users"}, {"service_account": "svc-alpha"}],
                "job": {"accounts": ["vo-a"], "partitions": ["debug"], "max_time": "1:00:00"},
            },
            {
                "id": "vo-b",
                "entitlements": [OTHER_VO],
                "allow": ["submit"],
                "mapping": [{"service_account": "svc-beta"}],
                "job": {"accounts": ["vo-b"], "partitions": ["long"]},
            },
        ],
        "tables": {"users": {"entries": [{"issuer": ISSUER, "subject": "alice", "user": "alice"}]}},
    }


@pytest.fixture
def config(tmp_path: Path) -> Path:
    make_settings(tmp_path, site_policy())
    return tmp_path / "config.yaml"


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))
    return path


def claims(tmp_path: Path, *entitlements: str, sub: str = "alice") -> Path:
    return write(tmp_path / "claims.json", {"iss": ISSUER, "sub": sub, "eduperson_entitlement": list(entitlements)})


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_check_lists_rules_in_evaluation_order(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "policy", "check", "--config", str(config))
    assert status == 0
    assert out.startswith("policy OK: 2 rule(s), digest ")
    assert out.index("1. vo-a") < out.index("2. vo-b")
    assert "allows: ping, submit" in out and "mapping: table:users -> service_account:svc-alpha" in out
    assert '"max_time_minutes": 60' in out and "note:" not in out


def test_check_given_paths_without_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = write(tmp_path / "p.yaml", {"rules": [{**site_policy()["rules"][1], "job": None}]})
    status, out, _ = run(capsys, "policy", "check", str(policy))
    assert status == 0
    assert "note: without --config" in out
    assert "warning:" in out and "rule vo-b: allows job submission without a `job:` section" in out


def test_check_reports_every_error_with_file_rule_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = site_policy()
    bad["rules"][0]["job"]["partitons"] = ["x"]
    bad["rules"][1]["allow"] = ["sbumit"]
    policy = write(tmp_path / "p.yaml", bad)
    status, out, err = run(capsys, "policy", "check", str(policy))
    assert (status, out) == (2, "")
    assert f"{policy}: rules[0] (id=vo-a).job.partitons: Extra inputs are not permitted" in err
    assert f"{policy}: rules[1] (id=vo-b).allow[0]: unknown operation group 'sbumit'" in err


def test_check_needs_paths_or_config(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "policy", "check")
    assert status == 2 and "give policy files or directories, or --config" in err


def test_check_of_the_shipped_examples(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "policy", "check", "--config", str(ROOT / "examples" / "config.yaml"))
    assert status == 0 and "vo-example-members" in out and "egi-access" in out


def test_explain_allow_shows_trace_account_and_forwarded_body(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = write(tmp_path / "job.json", {"script": "#!/bin/sh\n", "job": {"environment": {"PATH": "/bin"}}})
    status, out, _ = run(
        capsys,
        *("policy", "explain", "--config", str(config), "--claims", str(claims(tmp_path, VO_MEMBER, "junk"))),
        *("--request", "POST /slurm/v0.0.38/job/submit", "--body", str(body)),
    )
    assert status == 0, out
    assert "request:  POST /slurm/v0.0.38/job/submit" in out
    assert f"caller:   alice from {ISSUER}" in out
    assert f"entitlements considered (1):\n  {VO_MEMBER}\n  (ignored: 0 not group entitlements, 1 malformed)" in out
    assert f"1. vo-a  ({config.parent / 'policies' / 'policy.yaml'})" in out
    assert f"admits: holds {VO_MEMBER}; allows submit\n       job body: accepted\n       => decides" in out
    assert "2. vo-b" in out and "does not admit: holds none of the rule's entitlements" in out
    assert "decision: ALLOW by rule vo-a (submit): HTTP 200 allowed" in out
    assert "account:  alice (via table:users)" in out
    forwarded = json.loads(out[out.index("body as forwarded to slurmrestd:\n") + 33 :])
    assert forwarded["job"] == {
        "environment": {"PATH": "/bin"},
        "account": "vo-a",
        "partition": "debug",
        "time_limit": 60,
    }


def test_explain_deny_for_a_body_says_which_rule_and_field(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = write(tmp_path / "job.json", {"job": {"partition": "long", "environment": ["A=1"]}})
    status, out, _ = run(
        capsys,
        *("policy", "explain", "--config", str(config), "--claims", str(claims(tmp_path, VO_MEMBER))),
        *("--request", "POST /slurm/v0.0.42/job/submit", "--body", str(body)),
    )
    assert status == 1
    assert "job body: refused: job.partition 'long' is not allowed (allowed: debug)" in out
    assert "decision: DENY: HTTP 403 job_partition_not_allowed" in out
    assert "account:" not in out and "body as forwarded" not in out


def test_explain_deny_when_no_rule_admits(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(
        capsys,
        *("policy", "explain", "--config", str(config), "--claims", str(claims(tmp_path, sub="dave"))),
        *("--request", "GET /slurm/v0.0.42/ping", "--json"),
    )
    assert status == 1
    result = json.loads(out)
    assert (result["allowed"], result["status"], result["reason"]) == (False, 403, "no_rule_matches")
    assert [(s["rule_id"], s["admits"]) for s in result["steps"]] == [("vo-a", False), ("vo-b", False)]


def test_explain_operation_not_allowed_and_a_job_request_without_body(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    who = str(claims(tmp_path, OTHER_VO))
    status, out, _ = run(
        capsys, "policy", "explain", "-c", str(config), "--claims", who, "--request", "GET /slurm/v0.0.42/ping"
    )
    assert status == 1 and "operation_not_allowed" in out and "admits: holds" in out and "does not allow GET" in out
    status, out, _ = run(
        capsys, "policy", "explain", "-c", str(config), "--claims", who, "--request", "POST /slurm/v0.0.42/job/submit"
    )
    assert status == 0 and "account:  svc-beta (via service_account:svc-beta)" in out
    assert "give its body (--body)" in out


@pytest.mark.parametrize(
    ("claims_data", "request_line", "message"),
    [
        pytest.param({"sub": "x"}, "GET /slurm/v0.0.42/ping", "must be an object with an `iss` claim", id="no-iss"),
        pytest.param({"iss": "https://evil.example"}, "GET /x", "is not configured", id="untrusted-issuer"),
        pytest.param({"iss": ISSUER}, "GET /slurm/v0.0.42/ping", "no sub claim", id="no-subject"),
        pytest.param({"iss": ISSUER, "sub": "a"}, "/slurm/v0.0.42/ping", 'must be "METHOD PATH"', id="bad-request"),
    ],
)
def test_explain_input_errors(
    tmp_path: Path,
    config: Path,
    capsys: pytest.CaptureFixture[str],
    claims_data: dict[str, Any],
    request_line: str,
    message: str,
) -> None:
    who = write(tmp_path / "c.yaml", claims_data)
    status, _, err = run(
        capsys, "policy", "explain", "-c", str(config), "--claims", str(who), "--request", request_line
    )
    assert status == 2 and message in err


def test_explain_bad_path_is_a_400_decision(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    who = str(claims(tmp_path, VO_MEMBER))
    status, out, _ = run(
        capsys, "policy", "explain", "-c", str(config), "--claims", who, "--request", "GET /slurm/%2e%2e/x"
    )
    assert status == 1 and "HTTP 400 bad_path" in out


def test_explain_with_other_policy_files_and_no_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An admin can try a draft policy before it goes live, without a configuration."""
    draft = site_policy()
    draft["rules"][0]["allow"] = ["ping"]
    policy = write(tmp_path / "draft.yaml", draft)
    who = str(claims(tmp_path, VO_MEMBER))
    status, out, _ = run(
        capsys,
        "policy",
        "explain",
        "--policy",
        str(policy),
        "--claims",
        who,
        "--request",
        "POST /slurm/v0.0.42/job/submit",
    )
    assert status == 1 and "does not allow POST /slurm/v0.0.42/job/submit" in out and str(policy) in out


def test_explain_shows_mapping_steps_and_never_leases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pooled = site_policy()
    pooled["rules"][0]["mapping"] = [{"table": "users"}, {"pool": "vo"}]
    database = tmp_path / "leases.sqlite"
    identity = {"pools": {"vo": {"accounts": ["pool001..pool002"]}}, "pool_database": str(database)}
    make_settings(tmp_path, pooled, identity=identity)
    who = str(claims(tmp_path, VO_MEMBER, sub="newcomer"))
    argv = [
        "policy",
        "explain",
        "-c",
        str(tmp_path / "config.yaml"),
        "--claims",
        who,
        "--request",
        "GET /slurm/v0.0.42/ping",
    ]
    for _ in range(2):
        status, out, _ = run(capsys, *argv)
        assert status == 0, out
        assert "account:  pool001 (via pool:vo)" in out
        assert "  mapping table:users: - (no answer; next step)\n  mapping pool:vo: pool001 (chosen)" in out
    store = LeaseStore(database, {"vo": ("pool001", "pool002")}).open()
    try:
        assert store.find("vo", ISSUER, "newcomer") is None
    finally:
        store.close()


def test_check_with_config_also_checks_mapping_backends(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    draft = site_policy()
    draft["rules"][1]["mapping"] = [{"pool": "nowhere"}]
    policy = write(tmp_path / "draft.yaml", draft)
    status, _, err = run(capsys, "policy", "check", "--config", str(config), str(policy))
    assert status == 2 and "pool 'nowhere' is not configured under identity.pools" in err
