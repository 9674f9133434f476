"""Job requests in the pipeline: which requests carry a job, reading their body, and which rule accepts it.

A job request is ``POST /slurm/{version}/job/submit``, ``…/job/allocate`` or ``…/job/{job_id}``
(an update), whatever operation group allowed it. Its body is read whole (at most
``server.max_body_bytes``: 413), must be ``application/json`` (415) and valid JSON of the right
shape (400). Then, among the rules that admit the caller and allow the operation, in evaluation
order, the first whose job constraints the body meets decides; its defaults are filled in and
exactly that document is forwarded. If every such rule refuses the body, the first refusal is
the answer (403, naming the field). Nothing refused ever reaches slurmrestd.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.types import Scope

from slurmproxy.errors import PayloadTooLargeError, UnsupportedMediaTypeError
from slurmproxy.jobs.body import JobBody, JobKind, JobPolicyError, parse_job_body
from slurmproxy.jobs.fields import dialect_of
from slurmproxy.jobs.limits import apply_limits
from slurmproxy.policy.rules import Candidate, Decision, Policy, allowed, candidates
from slurmproxy.tokens import Principal

_JOB_PATH = re.compile(
    r"/slurm/(?P<version>v0\.0\.[0-9]{2})/job/(?P<what>submit|allocate|[0-9]{1,10}(?:_[0-9]{1,10})?)/?"
)
Refusals = list[tuple[str, JobPolicyError]]


@dataclass(frozen=True)
class JobRequest:
    kind: JobKind
    version: str


@dataclass(frozen=True)
class JobDecision:
    decision: Decision
    body: bytes
    document: dict[str, Any]
    refused: tuple[tuple[str, JobPolicyError], ...] = ()


def job_request(method: str, path: str) -> JobRequest | None:
    """The kind of job request, or None if the request carries no job description."""
    if method != "POST":
        return None
    match = _JOB_PATH.fullmatch(path)
    if match is None:
        return None
    what = match.group("what")
    kind: JobKind = "submit" if what == "submit" else "allocate" if what == "allocate" else "update"
    return JobRequest(kind, match.group("version"))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def check_content_type(value: str | None) -> None:
    """Only JSON is checked, so only JSON is accepted (slurmrestd would also parse YAML)."""
    media, _, params = (value or "").partition(";")
    charset = next((p.split("=", 1)[1].strip().strip('"').lower() for p in params.split(";") if "=" in p), None)
    if media.strip().lower() != "application/json" or charset not in (None, "utf-8"):
        raise UnsupportedMediaTypeError(
            f"a job request body must be application/json, not {value or 'unspecified'}",
            reason="unsupported_media_type",
        )


def check_job_headers(scope: Scope, limit: int) -> None:
    """Before reading a job body: no announced length above ``limit`` (413), and JSON only (415)."""
    length = _header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLargeError(f"the request body is larger than {limit} bytes")
    check_content_type(_header(scope, b"content-type"))


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
    raise refusal


def decide_job(
    policy: Policy, principal: Principal, method: str, path: str, request: JobRequest, raw: bytes
) -> JobDecision:
    """Parse and check the body against the candidate rules; the decision and the exact bytes to forward."""
    job = parse_job_body(request.kind, dialect_of(request.version), raw)
    candidate, document, refused = first_accepting(job, candidates(policy, principal, method, path))
    return JobDecision(allowed(candidate), encode(document), document, tuple(refused))
