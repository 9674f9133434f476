"""The loaded policy (compiled rules and mapping tables) and its evaluation.

Evaluation order: rules are considered in order (files in name order, rules in file order).
A rule *admits* a caller when every condition it states holds: the issuer is one it names (if it
names any), the subject is one it lists (if it lists any), and the caller holds at least one of
its entitlements (if it lists any). The first rule that admits the caller **and** allows the
operation (method + path) decides: its mapping chooses the local account. If no rule does, the
request is denied. ``evaluate`` is pure: no I/O, no clock, no logging.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from slurmproxy.entitlements import Entitlement, EntitlementRequirement
from slurmproxy.policy.operations import Operation
from slurmproxy.tokens import Principal


@dataclass(frozen=True)
class MappingStep:
    kind: Literal["table", "service_account", "alise", "pool"]
    target: str

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


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    tables: Mapping[str, Mapping[tuple[str, str], str]]
    sources: tuple[str, ...] = ()
    digest: str = ""


@dataclass(frozen=True)
class RuleTrace:
    rule_id: str
    admits: bool
    allows_operation: bool
    why: str


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    detail: str
    rule: Rule | None = None
    operation: Operation | None = None
    entitlement: str | None = None
    trace: tuple[RuleTrace, ...] = field(default=())


def _admits(rule: Rule, principal: Principal) -> tuple[bool, str, Entitlement | None]:
    if rule.issuers is not None and principal.issuer not in rule.issuers:
        return False, "issuer not listed by the rule", None
    if rule.subjects is not None and principal.subject not in rule.subjects:
        return False, "subject not listed by the rule", None
    if not rule.requirements:
        return True, "subject listed by the rule", None
    for requirement in rule.requirements:
        for ent in principal.parsed_entitlements:
            if requirement.matches(ent):
                return True, f"holds {ent}", ent
    return False, "holds none of the rule's entitlements", None


def _operation(rule: Rule, method: str, path: str) -> Operation | None:
    for op in rule.operations:
        if op.matches(method, path):
            return op
    return None


def evaluate(policy: Policy, principal: Principal, method: str, path: str, *, explain: bool = False) -> Decision:
    trace: list[RuleTrace] = []
    admitted: list[str] = []
    for rule in policy.rules:
        admits, why, ent = _admits(rule, principal)
        op = _operation(rule, method, path) if admits else None
        if explain:
            op_why = why if not admits else (f"allows {op.group}" if op else f"does not allow {method} {path}")
            trace.append(RuleTrace(rule.id, admits, op is not None, op_why))
        if admits:
            admitted.append(rule.id)
        if op is not None:
            return Decision(
                allowed=True,
                reason="allowed",
                detail=f"rule {rule.id} allows {op.group}",
                rule=rule,
                operation=op,
                entitlement=str(ent) if ent else None,
                trace=tuple(trace),
            )
    if admitted:
        return Decision(
            allowed=False,
            reason="operation_not_allowed",
            detail=f"no rule allows {method} {path}; rules that admit you ({', '.join(admitted)}) do not allow it",
            trace=tuple(trace),
        )
    return Decision(
        allowed=False,
        reason="no_rule_matches",
        detail=f"no rule allows {method} {path}: no rule admits this identity "
        "(check the entitlements your token or provider releases)",
        trace=tuple(trace),
    )
