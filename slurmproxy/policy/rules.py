"""The loaded policy (compiled rules and mapping tables) and its evaluation.

Evaluation order: rules are considered in order (files in name order, rules in file order).
A rule *admits* a caller when every condition it states holds: the issuer is one it names (if it
names any, or its file does), the subject is one it lists (if it lists any), every claim condition
holds (if it has any), and the caller holds at least one of its entitlements (if it lists any).
The first rule that admits the caller **and** allows the operation (method + path) decides: its
mapping chooses the local account. If no rule does, the request is denied. For job submissions and
updates the body takes part too (see :mod:`slurmproxy.jobs.decide`): the first such rule whose job
constraints the body meets decides. ``evaluate`` is pure: no I/O, no clock, no logging.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from slurmproxy.core.entitlements import Entitlement, EntitlementRequirement
from slurmproxy.core.principal import Principal
from slurmproxy.policy.limits import JobLimits
from slurmproxy.policy.model import RateLimitSpec
from slurmproxy.policy.operations import Operation

ClaimValue = str | int | bool


@dataclass(frozen=True)
class MappingStep:
    kind: Literal["table", "service_account", "alise", "pool"]
    target: str
    max_leases: int | None = None  # pool steps: the most leases of the pool the rule's identities may hold

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"


@dataclass(frozen=True)
class Rule:
    id: str
    source: str
    description: str
    issuers: frozenset[str] | None
    subjects: frozenset[str] | None
    requirements: tuple[EntitlementRequirement, ...]
    allow: tuple[str, ...]
    operations: tuple[Operation, ...]
    mapping: tuple[MappingStep, ...]
    claims: Mapping[str, tuple[ClaimValue, ...]] = field(default_factory=dict)
    job: JobLimits | None = None
    rate_limit: RateLimitSpec | None = None

    @property
    def groups(self) -> tuple[str, ...]:
        """The operation groups this rule allows, in order, without repeats."""
        return tuple(dict.fromkeys(op.group for op in self.operations))


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    tables: Mapping[str, Mapping[tuple[str, str], str]]
    sources: tuple[str, ...] = ()
    digest: str = ""
    inputs: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    _by_group: dict[tuple[str, str], list[int]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _any_group: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # An index from (namespace, group) to the rules that can match it: a rule that requires
        # entitlements can only admit a caller who holds one of that VO, whatever its other parts.
        for n, rule in enumerate(self.rules):
            if not rule.requirements:
                self._any_group.append(n)
            for key in dict.fromkeys((r.namespace, r.group) for r in rule.requirements):
                self._by_group.setdefault(key, []).append(n)

    def rules_for(self, principal: Principal) -> list[Rule]:
        """The rules that may admit this caller, in evaluation order (the others cannot)."""
        found = set(self._any_group)
        for ent in principal.parsed_entitlements:
            found.update(self._by_group.get((ent.namespace, ent.group), ()))
        return [self.rules[n] for n in sorted(found)]


@dataclass(frozen=True)
class RuleTrace:
    rule_id: str
    admits: bool
    allows_operation: bool
    why: str
    entitlement: str | None = None
    operation: str | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    detail: str
    rule: Rule | None = None
    operation: Operation | None = None
    entitlement: str | None = None
    trace: tuple[RuleTrace, ...] = field(default=())


def _claim_holds(value: Any, accepted: tuple[ClaimValue, ...]) -> bool:
    held = value if isinstance(value, list) else [value]
    # bool is an int in Python: compare type and value so that `true` never equals `1`.
    return any(type(h) is type(a) and h == a for h in held for a in accepted)


_MISSING = object()


def claim_value(principal: Principal, name: str) -> Any:
    """A claim from the provider's userinfo answer, else its introspection answer, else the token."""
    for source in (principal.userinfo, principal.introspection, principal.claims):
        if source is not None and name in source:
            return source[name]
    return _MISSING


def _admits(rule: Rule, principal: Principal) -> tuple[str | None, Entitlement | None]:
    """(None, entitlement) if ``rule`` admits the caller, else (the failed condition, None)."""
    if rule.issuers is not None and principal.issuer not in rule.issuers:
        return "issuers", None
    if rule.subjects is not None and principal.subject not in rule.subjects:
        return "subjects", None
    held = None
    if rule.requirements:
        held = next(
            (e for r in rule.requirements for e in principal.parsed_entitlements if r.matches(e)),
            None,
        )
        if held is None:
            return "entitlements", None
    for name, accepted in rule.claims.items():
        if not _claim_holds(claim_value(principal, name), accepted):
            return f"claims.{name}", None
    return None, held


def _why_not(rule: Rule, principal: Principal, failed: str) -> str:
    if failed == "issuers":
        return f"issuer {principal.issuer} is not one the rule admits"
    if failed == "subjects":
        return "subject not listed by the rule"
    if failed.startswith("claims."):
        name = failed[len("claims.") :]
        wanted = ", ".join(repr(a) for a in rule.claims[name])
        return f"claim {name} does not hold any of {wanted}"
    wanted = "; ".join(str(r) for r in rule.requirements)
    return f"holds none of the rule's entitlements ({wanted})"


def operation_of(rule: Rule, method: str, path: str) -> Operation | None:
    for op in rule.operations:
        if op.matches(method, path):
            return op
    return None


@dataclass(frozen=True)
class Candidate:
    """A rule that admits the caller and allows the operation."""

    rule: Rule
    operation: Operation
    entitlement: Entitlement | None


def walk(policy: Policy, principal: Principal, method: str, path: str) -> Iterator[tuple[RuleTrace, Candidate | None]]:
    """Every rule in evaluation order, with its trace line and, if it admits and allows, the candidate."""
    for rule in policy.rules:
        failed, ent = _admits(rule, principal)
        if failed is not None:
            yield RuleTrace(rule.id, False, False, _why_not(rule, principal, failed)), None
            continue
        op = operation_of(rule, method, path)
        why = f"holds {ent}" if ent is not None else "subject listed by the rule"
        why += f"; allows {op.group}" if op else f"; does not allow {method} {path}"
        line = RuleTrace(rule.id, True, op is not None, why, str(ent) if ent else None, op.group if op else None)
        yield line, Candidate(rule, op, ent) if op is not None else None


def admitting(policy: Policy, principal: Principal) -> Iterator[tuple[Rule, Entitlement | None]]:
    """The rules that admit the caller (whatever the operation), with the entitlement that did it."""
    for rule in policy.rules_for(principal):
        failed, ent = _admits(rule, principal)
        if failed is None:
            yield rule, ent


def candidates(policy: Policy, principal: Principal, method: str, path: str) -> Iterator[Candidate]:
    """The rules that admit the caller and allow the operation, in evaluation order (no trace)."""
    for rule in policy.rules_for(principal):
        failed, ent = _admits(rule, principal)
        if failed is None:
            op = operation_of(rule, method, path)
            if op is not None:
                yield Candidate(rule, op, ent)


def allowed(candidate: Candidate, trace: tuple[RuleTrace, ...] = ()) -> Decision:
    return Decision(
        allowed=True,
        reason="allowed",
        detail=f"rule {candidate.rule.id} allows {candidate.operation.group}",
        rule=candidate.rule,
        operation=candidate.operation,
        entitlement=str(candidate.entitlement) if candidate.entitlement else None,
        trace=trace,
    )


def denied(method: str, path: str, admitted: list[str], trace: tuple[RuleTrace, ...] = ()) -> Decision:
    if admitted:
        return Decision(
            allowed=False,
            reason="operation_not_allowed",
            detail=f"no rule allows {method} {path}; rules that admit you ({', '.join(admitted)}) do not allow it",
            trace=trace,
        )
    return Decision(
        allowed=False,
        reason="no_rule_matches",
        detail=f"no rule allows {method} {path}: no rule admits this identity "
        "(check the entitlements your token or provider releases)",
        trace=trace,
    )


def evaluate(policy: Policy, principal: Principal, method: str, path: str, *, explain: bool = False) -> Decision:
    """The first rule that admits the caller and allows the operation, or a denial saying why.

    With ``explain``, the decision carries a trace line for every rule, also those after the
    deciding one; without, nothing but the decision is computed.
    """
    if explain:
        trace: list[RuleTrace] = []
        decided: Candidate | None = None
        for line, candidate in walk(policy, principal, method, path):
            trace.append(line)
            decided = decided or candidate
        if decided is not None:
            return allowed(decided, tuple(trace))
        return denied(method, path, [t.rule_id for t in trace if t.admits], tuple(trace))
    admitted: list[str] = []
    for rule in policy.rules_for(principal):
        failed, ent = _admits(rule, principal)
        if failed is None:
            op = operation_of(rule, method, path)
            if op is not None:
                return allowed(Candidate(rule, op, ent))
            admitted.append(rule.id)
    return denied(method, path, admitted)
