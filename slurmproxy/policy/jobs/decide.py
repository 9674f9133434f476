"""Job requests in the pipeline: which requests carry a job, reading their body, and which rule accepts it.

A job request is ``POST /slurm/{version}/job/submit``, ``…/job/allocate`` or ``…/job/{job_id}``
(an update), whatever operation group allowed it. Its body is read whole (at most
``server.max_body_bytes``: 413), must be ``application/json`` (415) and valid JSON of the right
shape (400). Then, among the rules that admit the caller and allow the operation, in evaluation
order, the first whose job constraints the body meets decides; its defaults are filled in and
exactly that document is forwarded. If every such rule refuses the body, the first refusal is
the answer (403; its ``slurmproxy`` object names the ``rule`` and the ``field``). Nothing refused
ever reaches slurmrestd.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from slurmproxy.core.principal import Principal
from slurmproxy.core.slurmrest import JobRequest
from slurmproxy.errors import JobPolicyError, PayloadTooLargeError, UnsupportedMediaTypeError
from slurmproxy.policy.jobs.body import JobBody, parse_job_body
from slurmproxy.policy.jobs.limits import apply_limits
from slurmproxy.policy.rules import Candidate, Decision, Policy, allowed, candidates

Refusals = list[tuple[str, JobPolicyError]]


@dataclass(frozen=True)
class JobDecision:
    decision: Decision
    body: bytes
    document: dict[str, Any]
    refused: tuple[tuple[str, JobPolicyError], ...] = ()


def check_content_type(value: str | None) -> None:
    """Only JSON is checked, so only JSON is accepted (slurmrestd would also parse YAML)."""
    media, _, params = (value or "").partition(";")
    charset = next((p.split("=", 1)[1].strip().strip('"').lower() for p in params.split(";") if "=" in p), None)
    if media.strip().lower() != "application/json" or charset not in (None, "utf-8"):
        raise UnsupportedMediaTypeError(
            f"a job request body must be application/json, not {value or 'unspecified'}",
            reason="unsupported_media_type",
        )


def check_job_headers(content_type: str | None, content_length: str | None, limit: int) -> None:
    """Before reading a job body: no announced length above ``limit`` (413), and JSON only (415)."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLargeError(f"the request body is larger than {limit} bytes")
    check_content_type(content_type)


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def first_accepting(job: JobBody, rules: Iterable[Candidate]) -> tuple[Candidate, dict[str, Any], Refusals]:
    """The first candidate whose constraints the body meets, with the document to forward.

    Raises the first candidate's refusal if none accepts the body.
    """
    refused: Refusals = []
    for candidate in rules:
        try:
            return candidate, apply_limits(job, candidate.rule.job), refused
        except JobPolicyError as error:
            refused.append((candidate.rule.id, error))
    if not refused:  # the caller checked the operation first, on the same policy object: cannot happen
        raise JobPolicyError("", "no rule allows this job request", reason="operation_not_allowed")
    rule_id, first = refused[0]
    others = "; ".join(f"rule {r}: {e.detail}" for r, e in refused[1:])
    detail = f"rule {rule_id}: {first.detail}" + (f" (also refused by {others})" if others else "")
    refusal = JobPolicyError(first.field, detail, reason=first.reason)
    refusal.rule_id = rule_id
    refusal.fields["rule"] = rule_id
    raise refusal


def decide_job(
    policy: Policy, principal: Principal, method: str, path: str, request: JobRequest, raw: bytes
) -> JobDecision:
    """Parse and check the body against the candidate rules; the decision and the exact bytes to forward."""
    job = parse_job_body(request.kind, request.version, raw)
    candidate, document, refused = first_accepting(job, candidates(policy, principal, method, path))
    return JobDecision(allowed(candidate), encode(document), document, tuple(refused))
