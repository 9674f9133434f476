"""Identity mapping: a federated (issuer, subject) becomes a safe local account, or nobody.

The rule that allowed the request lists mapping steps, tried in order; the first that yields an
account wins, and the guard then checks it. A refused account is never replaced by a later step.
A step that cannot answer because its service failed (ALISE down, the lease database broken, a
pool exhausted) fails the request with 503: it never falls through to the next step, which would
hand the user a different account than the one the site linked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from slurmproxy.core.principal import Principal
from slurmproxy.errors import IdentityMappingError, ProxyError
from slurmproxy.identity.alise import AliseClient
from slurmproxy.identity.guard import AccountGuard, LocalAccount
from slurmproxy.identity.pool import LeaseBackend
from slurmproxy.identity.service import service_account
from slurmproxy.identity.table import table_lookup
from slurmproxy.policy.rules import MappingStep, Policy, Rule


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    detail: dict[str, Any] | None = None


@dataclass
class StepReport:
    """What one step answers for an identity (``slurmproxy mapping show``)."""

    step: str
    answer: str | None = None
    note: str = ""
    chosen: bool = False
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class IdentityMapper:
    def __init__(
        self,
        guard: AccountGuard,
        *,
        alise: Mapping[str, AliseClient] | None = None,
        pools: LeaseBackend | None = None,
    ) -> None:
        self.guard = guard
        self.alise = dict(alise or {})
        self.pools = pools

    async def map(self, policy: Policy, rule: Rule, principal: Principal) -> LocalAccount:
        tried: list[str] = []
        for step in rule.mapping:
            found = await self._resolve(policy, rule.id, step, principal, lease=True)
            if found is not None:
                return await self.guard.check(found.name, str(step), found.detail)
            tried.append(str(step))
        raise IdentityMappingError(
            f"no local account for this identity (rule {rule.id} tried {', '.join(tried)})", reason="unmapped"
        )

    async def explain(self, policy: Policy, rule: Rule, principal: Principal) -> list[StepReport]:
        """Every step's answer without side effects: a pool shows the lease it has or would take."""
        reports: list[StepReport] = []
        decided = False
        for step in rule.mapping:
            report = StepReport(str(step))
            reports.append(report)
            if decided:
                report.note = "not reached"
                continue
            try:
                found = await self._resolve(policy, rule.id, step, principal, lease=False)
            except ProxyError as exc:
                report.error, decided = f"{exc.reason}: {exc.detail}", True
                continue
            if found is None:
                report.note = "no answer; next step"
                continue
            report.answer, report.detail, decided = found.name, dict(found.detail or {}), True
            try:
                account = await self.guard.check(found.name, str(step))
            except ProxyError as exc:
                report.error = f"{exc.reason}: {exc.detail}"
                continue
            report.chosen = True
            report.note = f"uid {account.uid}" if account.uid is not None else "not in this host's user database"
        return reports

    async def _resolve(
        self, policy: Policy, rule_id: str, step: MappingStep, principal: Principal, *, lease: bool
    ) -> Candidate | None:
        issuer, subject = principal.issuer, principal.subject
        if step.kind == "table":
            name = table_lookup(policy, step.target, issuer, subject)
            return Candidate(name) if name is not None else None
        if step.kind == "service_account":
            return Candidate(service_account(step.target))
        if step.kind == "alise":
            client = self.alise.get(step.target)
            if client is None:
                raise IdentityMappingError(f"ALISE {step.target!r} is not configured", reason="backend_missing")
            answer = await client.lookup(issuer, subject)
            if answer.username is None:
                return None
            detail: dict[str, Any] = {"alise": answer.via}
            if answer.via == "last_known":
                detail["age_seconds"] = answer.age_seconds
            return Candidate(answer.username, detail)
        return await self._pool(step, rule_id, issuer, subject, lease=lease)

    async def _pool(
        self, step: MappingStep, rule_id: str, issuer: str, subject: str, *, lease: bool
    ) -> Candidate | None:
        pool = step.target
        if self.pools is None or pool not in self.pools.pools:
            raise IdentityMappingError(f"pool {pool!r} is not configured", reason="backend_missing")
        if lease:
            taken = await self.pools.lease(pool, issuer, subject, rule=rule_id, cap=step.max_leases)
            return Candidate(taken.account, taken.audit())
        existing = await self.pools.find(pool, issuer, subject)
        if existing is not None:
            return Candidate(existing.account, existing.audit())
        free = await self.pools.free(pool)
        if not free:
            raise IdentityMappingError(f"pool {pool} has no free account (would answer 503)", reason="pool_exhausted")
        return Candidate(free[0], {"lease": "would lease", "pool": pool, "free": len(free)})
