"""Strict parsing of job request bodies: JSON, then the body's shape, then each field's value.

Everything here is independent of the policy: a body that is not JSON, has duplicate keys, the
wrong shape, or a field whose value is not what the request's API version takes (its OpenAPI
document, :mod:`slurmproxy.policy.jobs.schema`) is a 400 naming the field; a body that sets
``user_id`` or ``group_id`` (in any letter case: v0.0.38 matches keys case-insensitively) is a 403
whatever the rule. Which fields and values are allowed is the rule's business
(:mod:`slurmproxy.policy.jobs.limits`).

``null`` for a field means "not set". Where the version's slurmrestd takes it so (measured per
field and version), the field is left out of the document that is checked and forwarded; where
slurmrestd refuses null or crashes on it (22.05 on ``argv``), it is refused with 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from slurmproxy.core.slurmrest import Dialect, JobKind
from slurmproxy.errors import JobBodyError, JobPolicyError
from slurmproxy.policy.jobs.fields import CRASHES_SLURMRESTD, FORBIDDEN_FIELDS
from slurmproxy.policy.jobs.schema import VersionRules, conforms, describe, rules_for

MAX_COMPONENTS = 128


@dataclass
class JobBody:
    """A parsed body. ``components`` are the job descriptions in it, each with its location; ``rules``
    the API version's job-body rules it was checked against."""

    kind: JobKind
    dialect: Dialect
    document: dict[str, Any]
    components: list[tuple[str, dict[str, Any]]]
    rules: VersionRules

    @property
    def version(self) -> str:
        return self.rules.version


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # slurmrestd and Python may disagree on which duplicate wins: refuse rather than guess.
            raise JobBodyError(f"the body has the key {key!r} twice", reason="bad_json")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise JobBodyError(f"the body has {name}, which is not JSON", reason="bad_json")


def parse_json(raw: bytes) -> Any:
    """RFC 8259 JSON in UTF-8; NaN/Infinity, duplicate keys and absurd nesting are refused."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobBodyError("the body is not UTF-8", reason="bad_json") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError as exc:
        raise JobBodyError("the body is nested too deeply", reason="bad_json") from exc
    except ValueError as exc:
        if isinstance(exc, JobBodyError):
            raise
        raise JobBodyError(f"the body is not valid JSON ({exc})", reason="bad_json") from exc


def body_error(field: str, detail: str) -> JobBodyError:
    error = JobBodyError(detail)
    error.fields["field"] = field
    return error


def _env_list(value: list[str]) -> bool:
    return all("=" in v and not v.startswith("=") for v in value)


def _env_object(value: dict[str, Any]) -> bool:
    return all(k and "=" not in k and isinstance(v, str) and "\x00" not in v for k, v in value.items())


def _check_component(where: str, component: Any, rules: VersionRules) -> dict[str, Any]:
    """The job description without its nulls-that-mean-unset; 400 for a value of the wrong shape."""
    if not isinstance(component, dict):
        raise body_error(where, f"{where or 'the body'} must be a JSON object (a job description)")
    out: dict[str, Any] = {}
    for key, value in component.items():
        name = f"{where}.{key}" if where else key
        if key.lower() in FORBIDDEN_FIELDS:
            raise JobPolicyError(name, f"{name} is not allowed: the proxy decides which user runs the job")
        shape = rules.fields.get(key)
        if shape is None:
            out[key] = value  # not a field of this version; the rule refuses it (slurmproxy.policy.jobs.limits)
            continue
        if value is None:
            if not rules.takes_null(key):
                raise body_error(name, f"{name}: {rules.null_refusal(key)}")
            continue
        if not conforms(value, shape, rules.dialect):
            raise body_error(name, f"{name} must be {describe(shape)} ({rules.version})")
        crash = CRASHES_SLURMRESTD.get(rules.version, {}).get(key)
        if crash is not None and value:
            raise JobPolicyError(
                name, f"{name} is not forwarded to {rules.version}: {crash}", reason="job_field_unsafe"
            )
        if key == "environment" and not (_env_list(value) if isinstance(value, list) else _env_object(value)):
            wanted = 'a list of "NAME=value" strings' if rules.dialect == "data_parser" else 'NAME: "value" pairs'
            raise body_error(name, f"{name} must be {wanted}")
        out[key] = value
    return out


def locate(kind: JobKind, document: dict[str, Any]) -> list[tuple[str, Any]]:
    """The job descriptions in a body, each with its location (``job``, ``jobs[1]``, or ``""``)."""
    if kind == "update":
        return [("", document)]
    single, many = ("job", "jobs") if kind == "submit" else ("job", "hetjob")
    if (single in document) == (many in document):
        raise JobBodyError(f"the body needs exactly one of {single!r} and {many!r}")
    if single in document:
        return [(single, document[single])]
    items = document[many]
    if not isinstance(items, list) or not items or len(items) > MAX_COMPONENTS:
        raise body_error(many, f"{many} must be a list of 1 to {MAX_COMPONENTS} job descriptions")
    return [(f"{many}[{n}]", item) for n, item in enumerate(items)]


def _place(kind: JobKind, document: dict[str, Any], checked: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The document with its job descriptions replaced by the checked ones."""
    if kind == "update":
        return checked[0][1]
    out = dict(document)
    key = next(k for k in ("job", "jobs", "hetjob") if k in document)
    out[key] = checked[0][1] if key == "job" else [component for _, component in checked]
    return out


def parse_job_body(kind: JobKind, version: str, raw: bytes) -> JobBody:
    """The body, parsed and shape-checked for ``version``; raises JobBodyError (400) or JobPolicyError (403)."""
    rules = rules_for(version)
    document = parse_json(raw)
    if not isinstance(document, dict):
        raise JobBodyError("the body must be a JSON object")
    top = rules.top_level(kind)
    for key in document if kind != "update" else ():
        if key.lower() in FORBIDDEN_FIELDS:
            raise JobPolicyError(key, f"{key} is not allowed: the proxy decides which user runs the job")
        if key not in top:
            raise JobPolicyError(key, f"{key!r} is not allowed at the top of a {kind} body ({', '.join(top)})")
    if kind != "update" and "script" in document:
        script = document["script"]
        if script is None and rules.takes_null("script"):
            document = {k: v for k, v in document.items() if k != "script"}
        elif not (isinstance(script, str) and "\x00" not in script):
            raise body_error("script", "script must be a string")
    checked = [(where, _check_component(where, item, rules)) for where, item in locate(kind, document)]
    document = _place(kind, document, checked)
    return JobBody(kind, rules.dialect, document, locate(kind, document), rules)
