from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from slurmproxy.entitlements import parse_all
from slurmproxy.policy import PolicyError, evaluate, load_policy
from slurmproxy.policy.operations import compile_path
from slurmproxy.tokens import Principal
from tests.helpers import ISSUER, OTHER_ISSUER, OTHER_VO, VO_MEMBER, basic_policy, write_policy


def principal(*entitlements: str, issuer: str = ISSUER, subject: str = "alice@example.org") -> Principal:
    parsed = parse_all(entitlements)
    return Principal(
        issuer=issuer,
        subject=subject,
        claims=MappingProxyType({}),
        entitlements=tuple(entitlements),
        expires_at=0.0,
        token_id="t",
        parsed_entitlements=parsed.valid,
        malformed_entitlements=parsed.malformed,
    )


def load(tmp_path: Path, policy: dict[str, Any]) -> Any:
    return load_policy([write_policy(tmp_path, policy)], trusted_issuers=[ISSUER, OTHER_ISSUER])


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/slurm/{version}/jobs", "/slurm/v0.0.38/jobs", True),
        ("/slurm/{version}/jobs", "/slurm/v0.0.38/jobs/", True),
        ("/slurm/{version}/jobs", "/slurm/v0.0.42/jobs", True),
        ("/slurm/{version}/jobs", "/slurm/v0.0.99/jobs", False),
        ("/slurm/{version}/jobs", "/slurm/v0.0.38/jobs/state", False),
        ("/slurm/{version}/jobs", "/slurm/v0.0.38/jobsx", False),
        ("/slurm/{version}/job/{job_id}", "/slurm/v0.0.38/job/12", True),
        ("/slurm/{version}/job/{job_id}", "/slurm/v0.0.38/job/12_3", True),
        ("/slurm/{version}/job/{job_id}", "/slurm/v0.0.38/job/submit", False),
        ("/slurm/{version}/job/{job_id}", "/slurm/v0.0.38/job/12/../submit", False),
        ("/slurm/{version}/node/{name}", "/slurm/v0.0.40/node/cn-01.cluster", True),
    ],
)
def test_path_patterns(pattern: str, path: str, matches: bool) -> None:
    assert (compile_path(pattern).fullmatch(path) is not None) is matches


@pytest.mark.parametrize(
    ("pattern", "message"),
    [("slurm/x", "must start with"), ("/slurm/{nope}", "unknown placeholder"), ("/slurm/.*", "characters outside")],
)
def test_bad_path_patterns(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compile_path(pattern)


@pytest.mark.parametrize(
    ("entitlements", "method", "path", "allowed", "reason"),
    [
        pytest.param([VO_MEMBER], "POST", "/slurm/v0.0.38/job/submit", True, "allowed", id="member-submits"),
        pytest.param([VO_MEMBER], "GET", "/slurm/v0.0.40/jobs", True, "allowed", id="member-lists"),
        pytest.param([VO_MEMBER], "DELETE", "/slurm/v0.0.38/job/7", True, "allowed", id="member-cancels"),
        pytest.param(
            [VO_MEMBER], "POST", "/slurm/v0.0.38/job/7", False, "operation_not_allowed", id="member-update-not-granted"
        ),
        pytest.param(
            [VO_MEMBER], "GET", "/slurmdb/v0.0.38/users", False, "operation_not_allowed", id="member-no-slurmdb"
        ),
        pytest.param([OTHER_VO], "GET", "/slurm/v0.0.38/jobs", False, "no_rule_matches", id="other-vo"),
        pytest.param([], "GET", "/slurm/v0.0.38/ping", False, "no_rule_matches", id="no-entitlements"),
        pytest.param(
            [VO_MEMBER.replace("vo.example.org", "vo.example.org.evil")],
            "GET",
            "/slurm/v0.0.38/ping",
            False,
            "no_rule_matches",
            id="suffix-vo",
        ),
    ],
)
def test_evaluate(tmp_path: Path, entitlements: list[str], method: str, path: str, allowed: bool, reason: str) -> None:
    decision = evaluate(load(tmp_path, basic_policy()), principal(*entitlements), method, path)
    assert decision.allowed is allowed
    assert decision.reason == reason
    if allowed:
        assert decision.rule is not None and decision.rule.id == "members"
        assert decision.entitlement == VO_MEMBER
    else:
        assert f"{method} {path}" in decision.detail


def test_first_rule_that_admits_and_allows_wins(tmp_path: Path) -> None:
    policy = {
        "rules": [
            {
                "id": "readers",
                "entitlements": [VO_MEMBER],
                "allow": ["read-only"],
                "mapping": [{"service_account": "a"}],
            },
            {
                "id": "submitters",
                "entitlements": [VO_MEMBER],
                "allow": ["submit"],
                "mapping": [{"service_account": "b"}],
            },
            {"id": "late", "entitlements": [VO_MEMBER], "allow": ["submit"], "mapping": [{"service_account": "c"}]},
        ]
    }
    loaded = load(tmp_path, policy)
    who = principal(VO_MEMBER)
    assert evaluate(loaded, who, "GET", "/slurm/v0.0.38/jobs").rule.id == "readers"  # type: ignore[union-attr]
    decision = evaluate(loaded, who, "POST", "/slurm/v0.0.38/job/submit", explain=True)
    assert decision.rule is not None and decision.rule.id == "submitters"
    assert [(t.rule_id, t.admits, t.allows_operation) for t in decision.trace] == [
        ("readers", True, False),
        ("submitters", True, True),
        ("late", True, True),  # explain shows every rule, also those after the deciding one
    ]
    assert [t.rule_id for t in evaluate(loaded, who, "DELETE", "/slurm/v0.0.38/job/1", explain=True).trace] == [
        "readers",
        "submitters",
        "late",
    ]


def test_issuer_and_subject_conditions(tmp_path: Path) -> None:
    policy = {
        "rules": [
            {
                "id": "ops",
                "issuers": [OTHER_ISSUER],
                "subjects": ["ops@example.org"],
                "allow": ["read-only"],
                "mapping": [{"service_account": "svc-alpha"}],
            }
        ]
    }
    loaded = load(tmp_path, policy)
    assert evaluate(
        loaded, principal(issuer=OTHER_ISSUER, subject="ops@example.org"), "GET", "/slurm/v0.0.38/jobs"
    ).allowed
    assert not evaluate(
        loaded, principal(issuer=ISSUER, subject="ops@example.org"), "GET", "/slurm/v0.0.38/jobs"
    ).allowed
    assert not evaluate(loaded, principal(issuer=OTHER_ISSUER, subject="x"), "GET", "/slurm/v0.0.38/jobs").allowed


def test_inline_operations_and_custom_groups(tmp_path: Path) -> None:
    policy = basic_policy(allow=["diagnostics", {"methods": ["GET"], "path": "/slurm/{version}/licenses"}])
    policy["operations"] = {"diagnostics": [{"methods": ["GET"], "path": "/slurm/{version}/diag"}]}
    loaded = load(tmp_path, policy)
    who = principal(VO_MEMBER)
    assert evaluate(loaded, who, "GET", "/slurm/v0.0.38/diag").allowed
    assert evaluate(loaded, who, "GET", "/slurm/v0.0.38/licenses").allowed
    assert not evaluate(loaded, who, "GET", "/slurm/v0.0.38/jobs").allowed


def test_structured_entitlement_requirement(tmp_path: Path) -> None:
    policy = basic_policy(entitlements=[{"group": "vo.example.org", "role": "member"}])
    loaded = load(tmp_path, policy)
    assert evaluate(loaded, principal(VO_MEMBER), "GET", "/slurm/v0.0.38/ping").allowed
    assert not evaluate(loaded, principal(OTHER_VO), "GET", "/slurm/v0.0.38/ping").allowed


def test_tables_from_yaml_and_csv_files(tmp_path: Path) -> None:
    (tmp_path / "users.csv").write_text(f"issuer,subject,user\n{ISSUER},carol@example.org,carol\n")
    (tmp_path / "more.yaml").write_text(f"entries:\n  - {{issuer: '{ISSUER}', subject: dave, user: dave}}\n")
    policy = basic_policy()
    policy["tables"] = {"users": {"file": "users.csv"}, "more": {"file": "more.yaml"}}
    loaded = load(tmp_path, policy)
    assert loaded.tables["users"][(ISSUER, "carol@example.org")] == "carol"
    assert loaded.tables["more"][(ISSUER, "dave")] == "dave"


def _errors(tmp_path: Path, policy: dict[str, Any] | str) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    if isinstance(policy, str):
        (tmp_path / "policy.yaml").write_text(policy)
    else:
        write_policy(tmp_path, policy)
    with pytest.raises(PolicyError) as err:
        load_policy([tmp_path], trusted_issuers=[ISSUER])
    return err.value.errors


def test_errors_name_file_rule_and_field(tmp_path: Path) -> None:
    errors = _errors(tmp_path, basic_policy(allow=["read-only", "sbumit"]))
    assert len(errors) == 1
    assert str(tmp_path / "policy.yaml") in errors[0]
    assert "rules[0] (id=members).allow[1]" in errors[0]
    assert "unknown operation group 'sbumit'" in errors[0]


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        pytest.param(basic_policy(typo=1), "rules[0] (id=members).typo: Extra inputs", id="unknown-key"),
        pytest.param(basic_policy(entitlements=["vo.example.org"]), "entitlements[0]: not an AARC", id="bad-ent"),
        pytest.param(basic_policy(mapping=[{"table": "nope"}]), "mapping[0]: unknown table 'nope'", id="bad-table"),
        pytest.param(
            basic_policy(issuers=["https://x.org"]), "issuers[0]: 'https://x.org' is not a configured", id="iss"
        ),
        pytest.param(basic_policy(entitlements=[]), "needs `entitlements` or `subjects`", id="admits-everyone"),
        pytest.param(basic_policy(allow=[]), "allow: List should have at least 1 item", id="empty-allow"),
        pytest.param(basic_policy(id="bad id!"), "rule id must match", id="bad-id"),
        pytest.param(
            basic_policy(allow=[{"methods": ["FETCH"], "path": "/x"}]), "unknown HTTP method", id="bad-method"
        ),
        pytest.param("rules: [", "not valid YAML", id="yaml-syntax"),
        pytest.param("- just a list", "Input should be a valid dictionary", id="not-a-mapping"),
    ],
)
def test_policy_errors(tmp_path: Path, policy: dict[str, Any] | str, fragment: str) -> None:
    assert any(fragment in e for e in _errors(tmp_path, policy)), _errors(tmp_path / "again", policy)


def test_all_errors_reported_at_once_across_files(tmp_path: Path) -> None:
    write_policy(tmp_path, basic_policy(allow=["nope"]), "a.yaml")
    write_policy(tmp_path, basic_policy(id="members", mapping=[{"table": "x"}]), "b.yaml")
    with pytest.raises(PolicyError) as err:
        load_policy([tmp_path])
    text = "\n".join(err.value.errors)
    assert "a.yaml" in text and "b.yaml" in text
    assert "id already used" in text
    assert "the table is already defined" in text


def test_no_policy_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no policy files"):
        load_policy([tmp_path])


def test_shipped_example_policies_are_valid() -> None:
    root = Path(__file__).resolve().parent.parent / "policies"
    policy = load_policy([root])
    assert policy.rules


def test_alise_and_pool_mapping_steps(tmp_path: Path) -> None:
    policy = load(tmp_path, basic_policy(mapping=[{"table": "users"}, {"alise": "egi"}, {"pool": "vo"}]))
    assert [str(step) for step in policy.rules[0].mapping] == ["table:users", "alise:egi", "pool:vo"]
    with pytest.raises(PolicyError) as err:
        load(tmp_path / "bad", basic_policy(mapping=[{"pool": "vo", "alise": "egi"}]))
    assert "mapping[0]" in err.value.errors[0]
