"""The policy stage's entry point: a caller and a request in, an authorized decision or a refusal out.

:meth:`Authorizer.authorize` evaluates the operation (method + path) against the rules; for a job
submission or update it then reads the body (only then, and only if the operation is allowed) and
checks it against the rules that allow it (:mod:`slurmproxy.policy.jobs.decide`); last, it takes a
token from the deciding rule's rate-limit buckets. A refusal raised after the operation was allowed
carries that decision (``error.rule``) for the audit record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from slurmproxy.core.principal import Principal
from slurmproxy.core.slurmrest import job_request
from slurmproxy.errors import AuthorizationError, ProxyError, RuleRef
from slurmproxy.policy.jobs.decide import check_job_headers, decide_job
from slurmproxy.policy.ratelimit import RateLimiter, RateLimits
from slurmproxy.policy.rules import Decision, Policy, Rule, evaluate

BodyReader = Callable[[], Awaitable[bytes]]
"""Reads the whole request body (at most ``server.max_body_bytes``, else 413)."""
THREAD_THRESHOLD_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """What the policy looks at: the method, the canonical path, and for job requests the body's headers."""

    method: str
    path: str
    content_type: str | None = None
    content_length: str | None = None


@dataclass(frozen=True, slots=True)
class Authorized:
    """An allowed request: the policy it was decided under, the decision, and for job requests the body
    exactly as it goes to slurmrestd (defaults filled in)."""

    policy: Policy
    decision: Decision
    body: bytes | None = None

    @property
    def ref(self) -> RuleRef:
        return ref_of(self.decision)

    @property
    def rule(self) -> Rule:
        assert self.decision.rule is not None
        return self.decision.rule

    @property
    def operation(self) -> str:
        assert self.decision.operation is not None
        return self.decision.operation.group


def ref_of(decision: Decision) -> RuleRef:
    assert decision.rule is not None and decision.operation is not None
    return RuleRef(decision.rule.id, decision.operation.group, decision.entitlement)


class Authorizer:
    """Holds the policy in force (a reload assigns :attr:`policy`) and the rules' rate-limit buckets."""

    def __init__(
        self,
        policy: Policy,
        *,
        max_body_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        rate_limits: RateLimits | None = None,
    ) -> None:
        self.policy = policy
        self._limit = max_body_bytes
        # The buckets: this process's (embedded), or the deployment's (slurmproxy.state, wired by the pipeline).
        self.rate_limiter: RateLimits = rate_limits if rate_limits is not None else RateLimiter(clock=clock)

    async def authorize(self, principal: Principal, request: PolicyRequest, read_body: BodyReader) -> Authorized:
        """The allowed decision (and checked body), or a refusal: 403, or for job requests 400/413/415."""
        policy = self.policy  # a reload swaps the attribute; this request keeps the policy it started with
        decision = evaluate(policy, principal, request.method, request.path)
        if not decision.allowed or decision.rule is None or decision.operation is None:
            raise AuthorizationError(decision.detail, reason=decision.reason)
        try:
            authorized = await self._check_job(policy, principal, request, decision, read_body)
        except ProxyError as error:
            error.rule = error.rule or ref_of(decision)
            if "field" in error.fields:  # a job body refused: say under which rule (its own, or the operation's)
                error.fields.setdefault("rule", decision.rule.id)
            raise
        try:
            assert authorized.decision.rule is not None
            await self.rate_limiter.take(authorized.decision.rule, principal, authorized.decision.entitlement)
        except ProxyError as error:
            error.rule = authorized.ref
            raise
        return authorized

    async def _check_job(
        self, policy: Policy, principal: Principal, request: PolicyRequest, decision: Decision, read: BodyReader
    ) -> Authorized:
        job = job_request(request.method, request.path)
        if job is None:
            return Authorized(policy, decision)
        check_job_headers(request.content_type, request.content_length, self._limit)
        raw = await read()
        args = (policy, principal, request.method, request.path, job, raw)
        if len(raw) > THREAD_THRESHOLD_BYTES:  # parsing a large body takes milliseconds: not on the event loop
            checked = await asyncio.to_thread(decide_job, *args)
        else:
            checked = decide_job(*args)
        return Authorized(policy, checked.decision, checked.body)
