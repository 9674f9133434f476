"""Authorization in the pipeline: the policy decision, and for job requests the checked body.

One call per request (:func:`authorize`): evaluate the operation; if it is a job submission or
update, read and check the body against the rules that allow it (:mod:`slurmproxy.jobs.decide`).
The audit record gets the deciding (or body-refusing) rule; :class:`PolicyStats` counts outcomes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.types import Receive, Scope

from slurmproxy.audit import AuditRecord
from slurmproxy.errors import AuthorizationError
from slurmproxy.jobs.body import JobPolicyError
from slurmproxy.jobs.decide import check_job_headers, decide_job, job_request
from slurmproxy.policy import Decision, Policy, evaluate
from slurmproxy.policy.stats import PolicyStats
from slurmproxy.tokens import Principal

BodyReader = Callable[[Receive, int], Awaitable[bytes]]
THREAD_THRESHOLD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Authorized:
    decision: Decision
    body: bytes | None = None  # for job requests: exactly what goes to slurmrestd


def _note(record: AuditRecord, decision: Decision) -> None:
    if decision.rule is not None and decision.operation is not None:
        record.set_decision(decision)  # rule, operation, entitlement and its VO


async def authorize(
    scope: Scope,
    receive: Receive,
    read: BodyReader,
    *,
    policy: Policy,
    principal: Principal,
    path: str,
    limit: int,
    stats: PolicyStats,
    record: AuditRecord,
) -> Authorized:
    """The allowed decision (and checked body), or AuthorizationError / JobPolicyError / 400 / 413 / 415."""
    method: str = scope["method"]
    stats.saw(principal)
    decision = evaluate(policy, principal, method, path)
    if not decision.allowed or decision.rule is None or decision.operation is None:
        stats.decided(decision)
        raise AuthorizationError(decision.detail, reason=decision.reason)
    _note(record, decision)
    request = job_request(method, path)
    if request is None:
        stats.decided(decision)
        return Authorized(decision)
    check_job_headers(scope, limit)
    raw = await read(receive, limit)
    try:
        if len(raw) > THREAD_THRESHOLD_BYTES:  # parsing a large body takes milliseconds: not on the event loop
            checked = await asyncio.to_thread(decide_job, policy, principal, method, path, request, raw)
        else:
            checked = decide_job(policy, principal, method, path, request, raw)
    except JobPolicyError as error:
        stats.refused(error.reason, error.rule_id or decision.rule.id)
        raise
    _note(record, checked.decision)
    stats.decided(checked.decision)
    return Authorized(checked.decision, checked.body)
