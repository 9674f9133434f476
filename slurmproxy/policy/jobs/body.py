"""Strict parsing of job request bodies: JSON, then the body's shape, then each known field's type.

Everything here is independent of the policy: a body that is not JSON, has duplicate keys, the
wrong shape or a field of the wrong type is a 400; a body that sets ``user_id`` or ``group_id``
(in any letter case: v0.0.38 matches keys case-insensitively) is a 403 whatever the rule. Which
other fields and values are allowed is the rule's business (:mod:`slurmproxy.jobs.limits`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slurmproxy.core.slurmrest import Dialect, JobKind
from slurmproxy.errors import JobBodyError, JobPolicyError
from slurmproxy.policy.jobs.fields import FIELDS, FORBIDDEN_FIELDS, Kind

MAX_COMPONENTS = 128
MAX_INT = 2**63 - 1
_NODES_COUNT = re.compile(r"\d{1,9}(?:-\d{1,9})?(?:,\d{1,9}(?:-\d{1,9})?)*")
_TOP_LEVEL: dict[JobKind, tuple[str, ...]] = {
    "submit": ("script", "job", "jobs"),
    "allocate": ("job", "hetjob"),
    "update": (),
}


@dataclass
class JobBody:
    """A parsed body. ``components`` are the job descriptions in it, each with its location."""

    kind: JobKind
    dialect: Dialect
    document: dict[str, Any]
    components: list[tuple[str, dict[str, Any]]]


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


def _str(value: Any) -> bool:
    return isinstance(value, str) and "\x00" not in value


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT


def _number(value: Any) -> bool:
    if _int(value):
        return True
    if not isinstance(value, dict) or not set(value) <= {"set", "infinite", "number"}:
        return False
    return all(isinstance(value.get(k, False), bool) for k in ("set", "infinite")) and (
        "number" not in value or _int(value["number"])
    )


def _env_list(value: Any) -> bool:
    return isinstance(value, list) and all(_str(v) and "=" in v and not v.startswith("=") for v in value)


def _env_object(value: Any) -> bool:
    return isinstance(value, dict) and all(k and "=" not in k and _str(v) for k, v in value.items())


def _nodes_range(value: Any) -> bool:
    return isinstance(value, list) and 1 <= len(value) <= 2 and all(_int(v) and v >= 1 for v in value)


def _nodes_count(value: Any) -> bool:
    return (_int(value) and value >= 1) or (isinstance(value, str) and _NODES_COUNT.fullmatch(value) is not None)


CHECKS: dict[Kind, tuple[Callable[[Any], bool], str]] = {
    "str": (_str, "a string"),
    "int": (_int, "a non-negative integer"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "strs": (lambda v: isinstance(v, list) and all(_str(s) for s in v), "a list of strings"),
    "flags": (lambda v: _str(v) or (isinstance(v, list) and all(_str(s) for s in v)), "a string or list of strings"),
    "number": (_number, 'an integer or {"set": …, "infinite": …, "number": …}'),
    "env_object": (_env_object, 'an object of NAME: "value" strings (v0.0.38)'),
    "env_list": (_env_list, 'a list of "NAME=value" strings (v0.0.39 and later)'),
    "nodes_range": (_nodes_range, "[min] or [min, max] node counts"),
    "nodes_count": (_nodes_count, 'a node count or range such as "2" or "1-4"'),
}


def _check_component(where: str, component: Any, dialect: Dialect) -> dict[str, Any]:
    if not isinstance(component, dict):
        raise JobBodyError(f"{where or 'the body'} must be a JSON object (a job description)")
    fields = FIELDS[dialect]
    for key, value in component.items():
        name = f"{where}.{key}" if where else key
        if key.lower() in FORBIDDEN_FIELDS:
            raise JobPolicyError(name, f"{name} is not allowed: the proxy decides which user runs the job")
        kind = fields.get(key)
        if kind is None:
            continue  # unknown here; the rule decides (extra_fields), see slurmproxy.jobs.limits
        check, wanted = CHECKS[kind]
        if not check(value):
            raise JobBodyError(f"{name} must be {wanted}")
    return component


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
        raise JobBodyError(f"{many} must be a list of 1 to {MAX_COMPONENTS} job descriptions")
    return [(f"{many}[{n}]", item) for n, item in enumerate(items)]


def parse_job_body(kind: JobKind, dialect: Dialect, raw: bytes) -> JobBody:
    """The body, parsed and shape-checked; raises JobBodyError (400) or JobPolicyError (403)."""
    document = parse_json(raw)
    if not isinstance(document, dict):
        raise JobBodyError("the body must be a JSON object")
    allowed_top = _TOP_LEVEL[kind]
    if kind != "update":
        for key in document:
            if key.lower() in FORBIDDEN_FIELDS:
                raise JobPolicyError(key, f"{key} is not allowed: the proxy decides which user runs the job")
            if key not in allowed_top:
                allowed = ", ".join(allowed_top)
                raise JobPolicyError(key, f"{key!r} is not allowed at the top of a {kind} body ({allowed})")
        if "script" in document and not _str(document["script"]):
            raise JobBodyError("script must be a string")
    components = [(where, _check_component(where, item, dialect)) for where, item in locate(kind, document)]
    return JobBody(kind, dialect, document, components)
