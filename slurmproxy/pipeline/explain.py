"""Would this token be allowed to do that, and why? A decision with its whole trace, as data.

:func:`explain` runs the same code as the proxy (:func:`~slurmproxy.policy.evaluate`, the job
body checks, the identity mapping) on a claim set, a request line and an optional body, and
records every step: the entitlements considered, every rule in evaluation order (admits or not
and why, allows the operation or not, accepts the job body or not and why), the deciding rule,
the local account, and the body exactly as it would be forwarded. Nothing is sent to Slurm, and
nothing changes: a pool mapping step shows the lease the caller has or would get, and takes none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from slurmproxy.core.entitlements import parse_all
from slurmproxy.core.paths import canonical_path
from slurmproxy.core.principal import Principal
from slurmproxy.core.slurmrest import job_request
from slurmproxy.errors import JobPolicyError, ProxyError
from slurmproxy.identity import IdentityMapper
from slurmproxy.policy.jobs.body import JobBody, parse_job_body
from slurmproxy.policy.jobs.decide import encode
from slurmproxy.policy.jobs.limits import apply_limits
from slurmproxy.policy.rules import Candidate, Policy, allowed, denied, walk


@dataclass
class RuleStep:
    rule_id: str
    source: str
    admits: bool
    why: str
    operation: str | None = None
    body: str | None = None  # "accepted" or why the body was refused
    decides: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Explanation:
    method: str
    path: str
    issuer: str
    subject: str
    entitlements: list[str]
    other_entitlements: int
    malformed_entitlements: int
    steps: list[RuleStep] = field(default_factory=list)
    allowed: bool = False
    status: int = 403
    reason: str = ""
    detail: str = ""
    rule: str | None = None
    operation: str | None = None
    account: str | None = None
    mapping: str | None = None
    mapping_steps: list[dict[str, Any]] = field(default_factory=list)
    body: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["steps"] = [s.as_dict() for s in self.steps]
        return data


def _refuse(out: Explanation, error: ProxyError) -> Explanation:
    out.allowed, out.status, out.reason, out.detail = False, error.status_code, error.reason, error.detail
    return out


Found = list[tuple[RuleStep, Candidate]]


def _first_accepting(found: Found, job: JobBody) -> tuple[Candidate, dict[str, Any]] | JobPolicyError:
    """Like the proxy: the first candidate whose job constraints the body meets, else the first refusal."""
    refusals: list[JobPolicyError] = []
    for step, candidate in found:
        try:
            document = apply_limits(job, candidate.rule.job)
        except JobPolicyError as error:
            step.body = f"refused: {error.detail}"
            refusals.append(error)
            continue
        step.body, step.decides = "accepted", True
        return candidate, document
    return refusals[0]


def _decide(out: Explanation, found: Found, body: bytes | None) -> tuple[Candidate, dict[str, Any] | None]:
    """The deciding candidate and the document to forward (None when the body is not checked)."""
    request = job_request(out.method, out.path)
    if request is not None and body is not None:
        try:
            job = parse_job_body(request.kind, request.version, body)
        except ProxyError:
            out.notes.append("the body was refused before any rule's job constraints were checked")
            raise
        chosen = _first_accepting(found, job)
        if isinstance(chosen, JobPolicyError):
            raise chosen
        return chosen
    if request is not None:
        out.notes.append("a job request: give its body (--body) to check it against the rules' job constraints")
    elif body is not None:
        out.notes.append("this request's body is not checked by the policy; it is forwarded as sent")
    found[0][0].decides = True
    return found[0][1], None


async def explain(
    policy: Policy, principal: Principal, method: str, raw_path: str, body: bytes | None, mapper: IdentityMapper
) -> Explanation:
    """The decision the proxy would make for this request, with every step that led to it."""
    parsed = parse_all(principal.entitlements)
    out = Explanation(
        method=method.upper(),
        path=raw_path,
        issuer=principal.issuer,
        subject=principal.subject,
        entitlements=[str(e) for e in parsed.valid],
        other_entitlements=parsed.other,
        malformed_entitlements=parsed.malformed,
    )
    try:
        out.path = canonical_path(raw_path.encode())
    except ProxyError as error:
        return _refuse(out, error)
    found: Found = []
    sources = {r.id: r.source for r in policy.rules}
    for line, candidate in walk(policy, principal, out.method, out.path):
        out.steps.append(RuleStep(line.rule_id, sources[line.rule_id], line.admits, line.why, line.operation))
        if candidate is not None:
            found.append((out.steps[-1], candidate))
    if not found:
        decision = denied(out.method, out.path, [s.rule_id for s in out.steps if s.admits])
        out.reason, out.detail = decision.reason, decision.detail
        return out
    try:
        candidate, document = _decide(out, found, body)
    except ProxyError as error:
        return _refuse(out, error)
    out.allowed, out.status, out.reason = True, 200, "allowed"
    out.detail = allowed(candidate).detail
    out.rule, out.operation = candidate.rule.id, candidate.operation.group
    if document is not None:
        out.body = document
        out.notes.append(f"forwarded as {len(encode(document))} bytes of JSON")
    # Without side effects: a pool step shows the lease the caller has or would get, and takes none.
    reports = await mapper.explain(policy, candidate.rule, principal)
    out.mapping_steps = [asdict(r) for r in reports]
    chosen = next((r for r in reports if r.chosen), None)
    if chosen is None:
        failed = next((r.error for r in reports if r.error), None)
        out.notes.append(f"rule {candidate.rule.id} allows it, but gives no local account")
        reason, _, detail = failed.partition(": ") if failed else ("unmapped", "", "no mapping step gave an account")
        # An ALISE or pool failure is the service's fault (503); anything else is a refusal (403).
        out.allowed, out.reason, out.detail = False, reason, detail
        out.status = 503 if reason.startswith(("alise_", "pool_")) else 403
        return out
    out.account, out.mapping = chosen.answer, chosen.step
    return out
