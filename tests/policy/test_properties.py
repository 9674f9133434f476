"""Property tests of policy matching (``slurmproxy.policy.evaluate``): deny by default, exact
entitlement matching, and agreement with a plain re-statement of the decision rule."""

from __future__ import annotations

from types import MappingProxyType

from hypothesis import given, settings, strategies as st

from slurmproxy.core.entitlements import parse_all, requirement_from_string
from slurmproxy.core.principal import Principal
from slurmproxy.policy import MappingStep, Policy, Rule, evaluate
from slurmproxy.policy.operations import Operation, builtin_operations

ISSUERS = ["https://idp.example.org", "https://other.example.org"]
SUBJECTS = ["alice", "bob", "carol", "alice@example.org"]
VOS = ["vo.example.org", "vo.example.org.evil", "vo.other.org", "example.org", "vo.example"]
ROLES = ["member", "manager", "vm_operator"]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", "Post", "TRACE"]
GROUPS = builtin_operations()
VERSIONS = ["v0.0.38", "v0.0.40", "v0.0.42", "v0.0.35", "v0.0.50", "V0.0.40", "v0.0.4"]
PATH_PARTS = [
    "slurm", "slurmdb", "openapi", "{v}", "ping", "jobs", "job", "submit", "state", "diag", "nodes", "node",
    "partitions", "reconfigure", "12", "12_3", "-1", "..", ".", "", "%2e", "v3", "openapi.json", "a;b", "x\\y",
]  # fmt: skip


def entitlement(vo: str, role: str, subgroup: str | None = None) -> str:
    sub = f":{subgroup}" if subgroup else ""
    return f"urn:mace:egi.eu:group:{vo}{sub}:role={role}#aai.egi.eu"


@st.composite
def principals(draw: st.DrawFn) -> Principal:
    values = draw(
        st.lists(
            st.builds(entitlement, st.sampled_from(VOS), st.sampled_from(ROLES), st.sampled_from([None, "admins"])),
            max_size=3,
        )
    )
    parsed = parse_all(values)
    return Principal(
        issuer=draw(st.sampled_from(ISSUERS)),
        subject=draw(st.sampled_from(SUBJECTS)),
        claims=MappingProxyType({}),
        entitlements=tuple(values),
        expires_at=0.0,
        token_id="t",
        parsed_entitlements=parsed.valid,
    )


@st.composite
def rules(draw: st.DrawFn, index: int) -> Rule:
    allow = draw(st.lists(st.sampled_from(sorted(GROUPS)), min_size=1, max_size=3, unique=True))
    requirements = draw(
        st.lists(st.builds(entitlement, st.sampled_from(VOS), st.sampled_from(ROLES)), max_size=2, unique=True)
    )
    subjects = draw(st.none() | st.frozensets(st.sampled_from(SUBJECTS), min_size=1))
    if not requirements and subjects is None:
        subjects = frozenset({draw(st.sampled_from(SUBJECTS))})
    return Rule(
        id=f"rule-{index}",
        source="property",
        description="",
        issuers=draw(st.none() | st.frozensets(st.sampled_from(ISSUERS), min_size=1)),
        subjects=subjects,
        requirements=tuple(requirement_from_string(r) for r in requirements),
        allow=tuple(allow),
        operations=tuple(op for group in allow for op in GROUPS[group]),
        mapping=(MappingStep("service_account", "svc"),),
    )


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    count = draw(st.integers(0, 4))
    return Policy(rules=tuple(draw(rules(n)) for n in range(count)), tables={})


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str]:
    parts = draw(st.lists(st.sampled_from(PATH_PARTS), min_size=1, max_size=5))
    version = draw(st.sampled_from(VERSIONS))
    path = "/" + "/".join(parts).replace("{v}", version) + draw(st.sampled_from(["", "/"]))
    return draw(st.sampled_from(METHODS)), path


def admits(rule: Rule, who: Principal) -> bool:
    if rule.issuers is not None and who.issuer not in rule.issuers:
        return False
    if rule.subjects is not None and who.subject not in rule.subjects:
        return False
    return not rule.requirements or any(r.matches(e) for r in rule.requirements for e in who.parsed_entitlements)


def operation_allowed(rule: Rule, method: str, path: str) -> Operation | None:
    return next((op for op in rule.operations if op.matches(method, path)), None)


@settings(max_examples=400, deadline=None)
@given(policies(), principals(), requests())
def test_evaluate_agrees_with_the_stated_rule(policy: Policy, who: Principal, request: tuple[str, str]) -> None:
    method, path = request
    decision = evaluate(policy, who, method, path)
    expected = next((r for r in policy.rules if admits(r, who) and operation_allowed(r, method, path)), None)
    assert decision.allowed == (expected is not None)
    if expected is not None:
        assert decision.rule is expected  # the first rule that admits and allows decides
        assert decision.operation is not None and decision.operation.matches(method, path)
    else:
        assert decision.rule is None and decision.reason in {"no_rule_matches", "operation_not_allowed"}


@settings(max_examples=200, deadline=None)
@given(principals(), requests())
def test_an_empty_policy_denies_everything(who: Principal, request: tuple[str, str]) -> None:
    assert not evaluate(Policy(rules=(), tables={}), who, *request).allowed


@settings(max_examples=300, deadline=None)
@given(policies(), principals(), requests())
def test_nothing_outside_slurmrestds_paths_and_methods_is_ever_allowed(
    policy: Policy, who: Principal, request: tuple[str, str]
) -> None:
    method, path = request
    decision = evaluate(policy, who, method, path)
    if decision.allowed:
        assert method in {"GET", "HEAD", "POST", "DELETE"}
        segments = path.strip("/").split("/")
        assert all(s not in {"", ".", ".."} and "%" not in s and ";" not in s and "\\" not in s for s in segments)
        assert segments[0] in {"slurm", "slurmdb", "openapi", "openapi.json", "openapi.yaml"}
        assert "reconfigure" not in segments


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(VOS),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz.-_0123456789", min_size=1, max_size=12),
    st.booleans(),
)
def test_vo_names_never_match_by_prefix_or_suffix(vo: str, extra: str, as_prefix: bool) -> None:
    other = f"{extra}{vo}" if as_prefix else f"{vo}{extra}"
    rule = Rule(
        "r",
        "p",
        "",
        None,
        None,
        (requirement_from_string(entitlement(vo, "member")),),
        ("ping",),
        GROUPS["ping"],
        (MappingStep("service_account", "svc"),),
    )
    values = (entitlement(other, "member"),)
    parsed = parse_all(values)
    who = Principal(ISSUERS[0], "alice", MappingProxyType({}), values, 0.0, "t", parsed.valid)
    assert not evaluate(Policy(rules=(rule,), tables={}), who, "GET", "/slurm/v0.0.40/ping").allowed
