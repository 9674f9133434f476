from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, strategies as st

from slurmproxy.core.entitlements import EntitlementRequirement
from slurmproxy.errors import PolicyError
from slurmproxy.policy import MappingStep, Policy, Rule, evaluate, load_policy
from slurmproxy.policy.limits import slurm_minutes
from slurmproxy.policy.operations import builtin_operations
from tests.helpers import (
    ISSUER,
    OTHER_ISSUER,
    OTHER_VO,
    VO_MEMBER,
    basic_policy,
    principal as principal,  # re-exported: other test modules import it from here
    write_policy,
)


def load(tmp_path: Path, policy: dict[str, Any], *trusted: str) -> Any:
    """Loaded as the proxy would with ``trusted`` issuers configured (default: the one test issuer)."""
    return load_policy([write_policy(tmp_path, policy)], trusted_issuers=list(trusted) or [ISSUER])


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
    loaded = load(tmp_path, policy, ISSUER, OTHER_ISSUER)
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


def _errors(tmp_path: Path, policy: dict[str, Any] | str, *trusted: str) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    if isinstance(policy, str):
        (tmp_path / "policy.yaml").write_text(policy)
    else:
        write_policy(tmp_path, policy)
    with pytest.raises(PolicyError) as err:
        load_policy([tmp_path], trusted_issuers=list(trusted) or [ISSUER])
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
    root = Path(__file__).resolve().parents[2] / "policies"
    policy = load_policy([root])
    assert policy.rules


def test_alise_and_pool_mapping_steps(tmp_path: Path) -> None:
    policy = load(tmp_path, basic_policy(mapping=[{"table": "users"}, {"alise": "egi"}, {"pool": "vo"}]))
    assert [str(step) for step in policy.rules[0].mapping] == ["table:users", "alise:egi", "pool:vo"]
    with pytest.raises(PolicyError) as err:
        load(tmp_path / "bad", basic_policy(mapping=[{"pool": "vo", "alise": "egi"}]))
    assert "mapping[0]" in err.value.errors[0]


# --- claims, file issuers, job sections, warnings, inputs ------------------------------------------

ASSURANCE = "https://refeds.org/assurance/IAP/medium"
SUBMIT = "/slurm/v0.0.42/job/submit"


def rule(id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": id,
        "entitlements": [VO_MEMBER],
        "allow": ["submit"],
        "mapping": [{"service_account": "svc"}],
        **fields,
    }


@pytest.mark.parametrize(
    ("claims", "allowed"),
    [
        pytest.param({"eduperson_assurance": [ASSURANCE, "other"]}, True, id="list-contains"),
        pytest.param({"eduperson_assurance": ASSURANCE}, True, id="string-equals"),
        pytest.param({"eduperson_assurance": ["https://refeds.org/assurance/IAP/low"]}, False, id="other-value"),
        pytest.param({"eduperson_assurance": ASSURANCE + "x"}, False, id="suffix"),
        pytest.param({}, False, id="missing"),
        pytest.param({"eduperson_assurance": [ASSURANCE], "acr": 1}, False, id="second-claim-wrong-type"),
        pytest.param({"eduperson_assurance": [ASSURANCE], "acr": True}, True, id="second-claim-bool"),
    ],
)
def test_claim_conditions(tmp_path: Path, claims: dict[str, Any], allowed: bool) -> None:
    policy = {
        "rules": [
            rule("assured", claims={"eduperson_assurance": [ASSURANCE], **({"acr": [True]} if "acr" in claims else {})})
        ]
    }
    decision = evaluate(load(tmp_path, policy), principal(VO_MEMBER, claims=claims), "POST", SUBMIT, explain=True)
    assert decision.allowed is allowed
    if not allowed:
        assert "claim" in decision.trace[0].why


def test_file_issuers_restrict_every_rule_of_the_file(tmp_path: Path) -> None:
    write_policy(tmp_path, {"issuers": [OTHER_ISSUER], "rules": [rule("other-only")]}, "a.yaml")
    write_policy(tmp_path, {"rules": [rule("anyone", allow=["read-only"], issuers=[ISSUER])]}, "b.yaml")
    loaded = load_policy([tmp_path], trusted_issuers=[ISSUER, OTHER_ISSUER])
    assert evaluate(loaded, principal(VO_MEMBER, issuer=OTHER_ISSUER), "POST", SUBMIT).allowed
    denied = evaluate(loaded, principal(VO_MEMBER, issuer=ISSUER), "POST", SUBMIT, explain=True)
    assert not denied.allowed and f"issuer {ISSUER} is not one the rule admits" in denied.trace[0].why


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        pytest.param(
            {"issuers": ["https://x.org"], "rules": []}, "issuers[0]: 'https://x.org' is not a configured", id="file"
        ),
        pytest.param(
            {"issuers": [ISSUER], "rules": [rule("r", issuers=[OTHER_ISSUER])]},
            "rules[0] (id=r).issuers[0]: 'https://other.example.org' is not among the file's issuers",
            id="rule-widens-file",
        ),
        pytest.param(
            {"rules": [rule("r", claims={"acr": []})]}, "claim 'acr' lists no accepted value", id="empty-claim"
        ),
        pytest.param({"rules": [rule("r", claims={"a b": ["x"]})]}, "not a claim name", id="bad-claim-name"),
        pytest.param({"rules": [rule("r", job={"accounts": []})]}, "would refuse every job", id="empty-accounts"),
        pytest.param({"rules": [rule("r", job={"partitions": ["a,b"]})]}, "not a Slurm account, partition", id="comma"),
        pytest.param({"rules": [rule("r", job={"qos": ["a", "a"]})]}, "listed twice", id="twice"),
        pytest.param(
            {"rules": [rule("r", job={"accounts": ["a"], "default_account": "b"})]},
            "default_account 'b' is not one of the allowed values",
            id="default-not-allowed",
        ),
        pytest.param({"rules": [rule("r", job={"max_time": "2 days"})]}, "job.max_time: not a Slurm time", id="time"),
        pytest.param({"rules": [rule("r", job={"max_time": 0})]}, "between 1 minute", id="zero-time"),
        pytest.param(
            {"rules": [rule("r", job={"max_time": 60, "default_time": 61})]}, "longer than max_time", id="default-time"
        ),
        pytest.param({"rules": [rule("r", job={"max_nodes": 0})]}, "max_nodes: Input should be greater", id="nodes"),
        pytest.param(
            {"rules": [rule("r", job={"extra_fields": ["user_id"]})]}, "can never be allowed", id="extra-user-id"
        ),
        pytest.param({"rules": [rule("r", job={"extra_fields": ["account"]})]}, "already allowed", id="extra-known"),
        pytest.param({"rules": [rule("r", job={"extra_fields": ["Bad-Name"]})]}, "not a job field", id="extra-bad"),
        pytest.param({"rules": [rule("r", job={"acounts": ["a"]})]}, "job.acounts: Extra inputs", id="typo"),
    ],
)
def test_new_sections_report_file_rule_and_field(tmp_path: Path, policy: dict[str, Any], fragment: str) -> None:
    errors = _errors(tmp_path, policy, ISSUER, OTHER_ISSUER)
    assert any(fragment in e and "policy.yaml" in e for e in errors), errors


@pytest.mark.parametrize(
    ("value", "minutes"),
    [
        pytest.param(90, 90, id="int"),
        pytest.param("90", 90, id="minutes"),
        pytest.param("90:30", 91, id="minutes-seconds-rounded-up"),
        pytest.param("1:30:00", 90, id="hours"),
        pytest.param("2-0", 2880, id="days-hours"),
        pytest.param("1-12:30", 2190, id="days-hours-minutes"),
        pytest.param("1-00:00:01", 1441, id="days-hms"),
    ],
)
def test_slurm_time_strings(value: int | str, minutes: int) -> None:
    assert slurm_minutes(value) == minutes


@pytest.mark.parametrize("value", ["", "1:2:3:4", "-5", "1.5", "abc", 0, True, 10**7])
def test_bad_slurm_time_strings(value: Any) -> None:
    with pytest.raises(ValueError):
        slurm_minutes(value)


def test_job_section_compiles_with_defaults(tmp_path: Path) -> None:
    job = {"accounts": ["b", "a"], "partitions": ["p"], "default_partition": "p", "max_time": "1:00:00"}
    loaded = load(tmp_path, {"rules": [rule("r", job=job)]})
    limits = loaded.rules[0].job
    assert limits is not None
    assert (limits.default_account, limits.default_partition, limits.default_qos) == ("b", "p", None)
    assert limits.accounts == frozenset({"a", "b"}) and limits.qos is None
    assert (limits.max_minutes, limits.default_minutes) == (60, 60)


def test_warnings_for_unrestricted_submission(tmp_path: Path) -> None:
    policy = {
        "rules": [
            rule("no-job"),
            rule("no-accounts", job={"partitions": ["p"]}),
            rule("fine", job={"accounts": ["a"]}),
            rule("reader", allow=["read-only"]),
        ]
    }
    warnings = load(tmp_path, policy).warnings
    assert len(warnings) == 2
    assert "rule no-job: allows job submission without a `job:` section" in warnings[0]
    assert "rule no-accounts: job.accounts is not restricted" in warnings[1]


def test_inputs_and_digest_cover_mapping_tables(tmp_path: Path) -> None:
    table = tmp_path / "users.yaml"
    table.write_text(f"entries:\n  - {{issuer: '{ISSUER}', subject: a, user: alice}}\n")
    policy = basic_policy()
    policy["tables"] = {"users": {"file": "users.yaml"}}
    first = load(tmp_path, policy)
    assert str(table) in first.inputs and str(tmp_path / "policy.yaml") in first.inputs
    table.write_text(f"entries:\n  - {{issuer: '{ISSUER}', subject: a, user: bob}}\n")
    assert load(tmp_path, policy).digest != first.digest


def test_sections_with_only_comments_are_empty(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("rules:\n  # nothing yet\noperations:\ntables:\n")
    write_policy(tmp_path, basic_policy(), "b.yaml")
    assert [r.id for r in load_policy([tmp_path]).rules] == ["members"]


@pytest.mark.parametrize(
    ("entitlements", "claims", "method", "path", "decider", "reason"),
    [
        pytest.param([VO_MEMBER], {}, "POST", SUBMIT, "vo-a", "allowed", id="vo-a-submits"),
        pytest.param([OTHER_VO], {}, "POST", SUBMIT, "vo-b", "allowed", id="vo-b-submits"),
        pytest.param([OTHER_VO], {}, "GET", "/slurmdb/v0.0.42/jobs", None, "operation_not_allowed", id="b-no-db"),
        pytest.param([VO_MEMBER, OTHER_VO], {}, "POST", SUBMIT, "vo-a", "allowed", id="both-first-wins"),
        pytest.param([VO_MEMBER], {}, "GET", "/slurmdb/v0.0.42/jobs", "vo-a-managers", "allowed", id="falls-through"),
        pytest.param(
            [VO_MEMBER.replace(":role=member", ":role=manager")],
            {},
            "GET",
            "/slurm/v0.0.42/jobs",
            None,
            "no_rule_matches",
            id="manager-role-only-not-member",
        ),
        pytest.param([VO_MEMBER], {"sub": "x"}, "DELETE", "/slurm/v0.0.42/job/5", "vo-a", "allowed", id="cancel"),
        pytest.param([VO_MEMBER], {}, "DELETE", "/slurm/v0.0.42/jobs", None, "operation_not_allowed", id="bulk-cancel"),
        pytest.param([VO_MEMBER], {}, "PUT", SUBMIT, None, "operation_not_allowed", id="wrong-method"),
        pytest.param([], {}, "GET", "/slurm/v0.0.42/ping", None, "no_rule_matches", id="nobody"),
    ],
)
def test_multi_vo_evaluation_table(
    tmp_path: Path,
    entitlements: list[str],
    claims: dict[str, Any],
    method: str,
    path: str,
    decider: str | None,
    reason: str,
) -> None:
    policy = {
        "rules": [
            rule("vo-a", allow=["ping", "read-only", "submit", "cancel-own"], job={"accounts": ["a"]}),
            rule("vo-a-managers", allow=["read-accounting"]),
            rule("vo-b", entitlements=[OTHER_VO], allow=["submit"], job={"accounts": ["b"]}),
        ]
    }
    decision = evaluate(load(tmp_path, policy), principal(*entitlements, claims=claims), method, path)
    assert (decision.rule.id if decision.rule else None, decision.reason) == (decider, reason)


_GROUPS = ["vo.a", "vo.b", "vo.c"]
_OPS = builtin_operations()


@st.composite
def policies_and_callers(draw: st.DrawFn) -> tuple[Policy, Any, str, str]:
    rules = []
    for n in range(draw(st.integers(1, 8))):
        groups = draw(st.lists(st.sampled_from(_GROUPS), max_size=2))
        requirements = tuple(
            EntitlementRequirement("urn:mace:egi.eu", g, role=draw(st.sampled_from([None, "member"]))) for g in groups
        )
        allow = draw(st.lists(st.sampled_from(["read-only", "submit", "cancel-own"]), min_size=1, max_size=2))
        rules.append(
            Rule(
                id=f"r{n}",
                source="mem",
                description="",
                issuers=None,
                subjects=None if requirements else frozenset({draw(st.sampled_from(["alice", "bob"]))}),
                requirements=requirements,
                allow=tuple(allow),
                operations=tuple(op for group in allow for op in _OPS[group]),
                mapping=(MappingStep("service_account", "svc"),),
            )
        )
    held = draw(st.lists(st.sampled_from(_GROUPS), max_size=3))
    roles = draw(st.lists(st.sampled_from(["member", "manager"]), min_size=len(held), max_size=len(held)))
    entitlements = [f"urn:mace:egi.eu:group:{g}:role={r}#aai.egi.eu" for g, r in zip(held, roles, strict=True)]
    who = principal(*entitlements, subject=draw(st.sampled_from(["alice", "bob"])))
    method, path = draw(
        st.sampled_from([("GET", "/slurm/v0.0.42/jobs"), ("POST", SUBMIT), ("DELETE", "/slurm/v0.0.40/job/3")])
    )
    return Policy(rules=tuple(rules), tables={}), who, method, path


@given(policies_and_callers())
def test_the_rule_index_never_changes_a_decision(case: tuple[Policy, Any, str, str]) -> None:
    """The fast path (rules indexed by VO) decides exactly as walking every rule in order does."""
    policy, who, method, path = case
    fast, slow = evaluate(policy, who, method, path), evaluate(policy, who, method, path, explain=True)
    assert (fast.allowed, fast.reason, fast.rule, fast.entitlement) == (
        slow.allowed,
        slow.reason,
        slow.rule,
        slow.entitlement,
    )
    if not fast.allowed:
        assert fast.detail == slow.detail


def test_claim_conditions_read_userinfo_then_introspection_then_the_token(tmp_path: Path) -> None:
    loaded = load(tmp_path, {"rules": [rule("assured", claims={"eduperson_assurance": [ASSURANCE]})]})
    base = principal(VO_MEMBER, claims={"eduperson_assurance": "https://refeds.org/assurance/IAP/low"})
    from_userinfo = dataclasses.replace(base, userinfo=MappingProxyType({"eduperson_assurance": [ASSURANCE]}))
    from_introspection = dataclasses.replace(base, introspection=MappingProxyType({"eduperson_assurance": ASSURANCE}))
    overridden = dataclasses.replace(from_introspection, userinfo=MappingProxyType({"eduperson_assurance": []}))
    assert not evaluate(loaded, base, "POST", SUBMIT).allowed
    assert evaluate(loaded, from_userinfo, "POST", SUBMIT).allowed
    assert evaluate(loaded, from_introspection, "POST", SUBMIT).allowed
    assert not evaluate(loaded, overridden, "POST", SUBMIT).allowed


# --- issue 15: rules bound to issuers, accounts shared across VOs -----------------------------------


def test_with_several_issuers_every_rule_must_name_its_issuers(tmp_path: Path) -> None:
    """A second issuer (a Check-in -demo preset, a site IdP) must not assert the entitlements of rules
    written for the first: with two issuers configured, a rule without `issuers:` is refused."""
    write_policy(tmp_path, {"rules": [rule("unbound"), rule("bound", issuers=[ISSUER])]})
    with pytest.raises(PolicyError) as err:
        load_policy([tmp_path], trusted_issuers=[ISSUER, OTHER_ISSUER])
    (problem,) = err.value.errors
    assert "rules[0] (id=unbound): names no issuers, but 2 issuers are configured" in problem
    assert load_policy([tmp_path], trusted_issuers=[ISSUER]).rules[0].issuers is None  # one issuer: implied
    write_policy(tmp_path, {"issuers": [ISSUER], "rules": [rule("unbound"), rule("bound", issuers=[ISSUER])]})
    assert load_policy([tmp_path], trusted_issuers=[ISSUER, OTHER_ISSUER]).rules[0].issuers == frozenset({ISSUER})


def test_a_rule_listing_subjects_always_names_its_issuers(tmp_path: Path) -> None:
    robot = {"id": "robot", "subjects": ["ops"], "allow": ["ping"], "mapping": [{"service_account": "svc-ops"}]}
    write_policy(tmp_path, {"rules": [robot]})
    for trusted in ([ISSUER], None):
        with pytest.raises(PolicyError) as err:
            load_policy([tmp_path], trusted_issuers=trusted)
        assert "rules[0] (id=robot): lists subjects but names no issuers" in err.value.errors[0]
    write_policy(tmp_path, {"rules": [{**robot, "issuers": [ISSUER]}]})
    assert load_policy([tmp_path], trusted_issuers=[ISSUER]).rules[0].subjects == frozenset({"ops"})


def test_an_account_shared_by_rules_of_different_vos_is_a_warning_naming_them(tmp_path: Path) -> None:
    open_vo = "urn:mace:egi.eu:group:vo.access.egi.eu:role=member#aai.egi.eu"
    managers = VO_MEMBER.replace("role=member", "role=manager")
    policy = {
        "rules": [
            rule("members", mapping=[{"service_account": "svc-beta"}], job={"accounts": ["a"]}),
            rule("managers", entitlements=[managers], mapping=[{"service_account": "svc-beta"}], allow=["ping"]),
            rule("open", entitlements=[open_vo], mapping=[{"service_account": "svc-beta"}], job={"accounts": ["b"]}),
            rule("own", entitlements=[OTHER_VO], mapping=[{"service_account": "svc-own"}], job={"accounts": ["c"]}),
        ]
    }
    (warning,) = load(tmp_path, policy).warnings
    assert "local account svc-beta is reachable from rules of different VOs" in warning
    assert "VO vo.access.egi.eu: open" in warning and "VO vo.example.org: members, managers" in warning
    assert "shares every -own operation" in warning
    same_vo = {"rules": policy["rules"][:2] + policy["rules"][3:]}
    assert load(tmp_path / "same-vo", same_vo).warnings == ()


def test_an_account_shared_by_rules_of_different_issuers_is_a_warning(tmp_path: Path) -> None:
    policy = {
        "rules": [
            rule("here", issuers=[ISSUER], job={"accounts": ["a"]}),
            rule("there", issuers=[OTHER_ISSUER], job={"accounts": ["a"]}),
        ]
    }
    write_policy(tmp_path, policy)
    (warning,) = load_policy([tmp_path], trusted_issuers=[ISSUER, OTHER_ISSUER]).warnings
    assert "local account svc is reachable from rules admitting different issuers" in warning
    assert f"{ISSUER}: here" in warning and f"{OTHER_ISSUER}: there" in warning
