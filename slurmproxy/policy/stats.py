"""Plain counters about policy decisions, for metrics exporters and readiness (no exporter here).

Counters only grow; an exporter reads them (``decisions`` maps ``(outcome, reason, rule)`` to a
count, ``rule`` being ``""`` when no rule decided).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from slurmproxy.policy.rules import Decision
from slurmproxy.tokens import Principal


@dataclass
class PolicyStats:
    decisions: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    malformed_entitlements: int = 0
    requests_with_malformed_entitlements: int = 0

    def saw(self, principal: Principal) -> None:
        """Count the caller's malformed entitlements (ignored by evaluation, never an error)."""
        if principal.malformed_entitlements:
            self.malformed_entitlements += principal.malformed_entitlements
            self.requests_with_malformed_entitlements += 1

    def decided(self, decision: Decision) -> None:
        rule = decision.rule.id if decision.rule is not None else ""
        self.decisions["allow" if decision.allowed else "deny", decision.reason, rule] += 1

    def refused(self, reason: str, rule: str) -> None:
        """A job body refused by the policy (after the operation was allowed)."""
        self.decisions["deny", reason, rule] += 1
