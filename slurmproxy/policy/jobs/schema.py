"""What each slurmrestd API version takes in a job body, from the committed rules in ``openapi/``.

The files ``openapi/<version>.json`` are made by ``python -m devstack.jobschema write`` from a real
slurmrestd of each generation: the job fields and their value shapes come from the version's own
OpenAPI document, and what ``null`` does to each field is measured (see devstack/jobschema.py).
``tests/integration/test_job_schema.py`` fails when a running slurmrestd no longer matches them.

Shapes are small JSON-schema-like objects: ``{"type": "string" | "integer" | "boolean" | "number" |
"no_val" | "array" | "object" | "any"}`` with ``format`` (``int32``/``int64``), ``enum``, ``items``,
``minItems``/``maxItems`` and ``properties``. ``no_val`` is Slurm's ``{"set", "infinite",
"number"}`` structure; slurmrestd also takes a plain integer there.

Beyond the documents, measured with every data_parser version (v0.0.40 to v0.0.45): an array of
enumerated strings (flags such as ``mail_type``, ``shared``) also takes one of them as a plain
string. Other forms slurmrestd converts with only a warning (``"tasks": "4"`` becomes 4 tasks, an
object for ``environment``, a float for an integer) are refused: the proxy checks values in the
forms the document gives.

A version without a file of its own (a Slurm released after this proxy) is checked with the rules
of the nearest known version of the same dialect, older first.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from slurmproxy.core.slurmrest import Dialect, JobKind, dialect_of, version_key

Shape = dict[str, Any]
MAX_BY_FORMAT = {"int32": 2**31 - 1, "int64": 2**63 - 1}
FORWARDED_NULLS = frozenset({"unset", "changes"})
"""Null verdicts under which the proxy takes ``null`` and forwards the job without the field."""


@dataclass(frozen=True)
class VersionRules:
    """One API version's job bodies: fields and shapes, top-level keys, and which fields take null."""

    version: str
    dialect: Dialect
    fields: dict[str, Shape]
    bodies: dict[str, dict[str, Any]]
    null: dict[str, str]

    def top_level(self, kind: JobKind) -> dict[str, str]:
        """The keys a body of this kind may have at its top (``script``, ``job``, ``jobs``, ``hetjob``)."""
        if kind == "update":
            return {}
        body = self.bodies.get(kind)
        if body is None:
            return {"job": "job", "jobs": "jobs"} if kind == "submit" else {"job": "job", "hetjob": "jobs"}
        keys: dict[str, str] = body["keys"]
        return keys

    def takes_null(self, field: str) -> bool:
        return self.null.get(field, "refused") in FORWARDED_NULLS

    def null_refusal(self, field: str) -> str:
        verdict = self.null.get(field, "refused")
        why = {
            "refused": "slurmrestd refuses it",
            "crashes": "slurmrestd crashes on it",
        }.get(verdict, "its meaning there is not known")
        return f"{self.version} does not take null for {field} ({why}); leave the field out"


@cache
def known_versions() -> tuple[str, ...]:
    folder = resources.files(__package__).joinpath("openapi")
    names = [entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json")]
    return tuple(sorted(names, key=version_key))


@cache
def _load(version: str) -> VersionRules:
    text = resources.files(__package__).joinpath("openapi", f"{version}.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return VersionRules(version, dialect_of(version), data["job"], data["bodies"], data.get("null", {}))


def rules_for(version: str) -> VersionRules:
    """The rules of ``version``, or of the nearest known version of its dialect (older first)."""
    known = known_versions()
    if version in known:
        return _load(version)
    dialect = dialect_of(version)
    same = [v for v in known if dialect_of(v) == dialect]
    if not same:
        raise LookupError(f"no job-body rules for the {dialect} dialect")
    older = [v for v in same if version_key(v) < version_key(version)]
    return _load(older[-1] if older else same[0])


def _integer(value: Any, shape: Shape) -> bool:
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return 0 <= value <= MAX_BY_FORMAT.get(shape.get("format", "int64"), MAX_BY_FORMAT["int64"])


def _no_val(value: Any, shape: Shape) -> bool:
    if _integer(value, shape):
        return True
    if not isinstance(value, dict) or not value or not set(value) <= {"set", "infinite", "number"}:
        return False
    flags_ok = all(isinstance(value.get(k, False), bool) for k in ("set", "infinite"))
    return flags_ok and ("number" not in value or _integer(value["number"], shape))


def _enum_ok(value: Any, shape: Shape) -> bool:
    return "enum" not in shape or value in list(shape["enum"])


def conforms(value: Any, shape: Shape, dialect: Dialect) -> bool:
    """Whether ``value`` has ``shape`` (null is handled by the caller, per field)."""
    kind: str = shape.get("type", "any")
    if kind == "string":
        return isinstance(value, str) and "\x00" not in value and _enum_ok(value, shape)
    if kind == "integer":
        return _integer(value, shape)
    if kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok and math.isfinite(value) and value >= 0
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "no_val":
        return _no_val(value, shape)
    if kind == "array":
        return _array(value, shape, dialect)
    if kind == "object":
        return _object(value, shape, dialect)
    return kind == "any"


def _array(value: Any, shape: Shape, dialect: Dialect) -> bool:
    items: Shape = shape.get("items", {"type": "any"})
    if isinstance(value, str) and dialect == "data_parser" and "enum" in items:
        return conforms(value, items, dialect)  # one flag as a plain string
    if not isinstance(value, list):
        return False
    if not shape.get("minItems", 0) <= len(value) <= shape.get("maxItems", len(value)):
        return False
    return all(conforms(item, items, dialect) for item in value)


def _object(value: Any, shape: Shape, dialect: Dialect) -> bool:
    if not isinstance(value, dict):
        return False
    properties: dict[str, Shape] | None = shape.get("properties")
    if properties is None:
        return True
    return all(key in properties and conforms(item, properties[key], dialect) for key, item in value.items())


def describe(shape: Shape) -> str:
    """The shape in words, for error messages."""
    kind = shape.get("type", "any")
    if kind == "string":
        return f"one of {', '.join(map(repr, shape['enum']))}" if "enum" in shape else "a string"
    if kind in ("integer", "number"):
        return "a non-negative " + ("integer" if kind == "integer" else "number")
    if kind == "boolean":
        return "true or false"
    if kind == "no_val":
        return 'an integer or {"set": …, "infinite": …, "number": …}'
    if kind == "array":
        items = shape.get("items", {})
        plural = {"string": "strings", "integer": "non-negative integers", "boolean": "booleans"}
        what = plural.get(items.get("type"), "values")
        if "enum" in items:
            return f"a list of {', '.join(map(repr, items['enum']))} (or one of them as a string)"
        size = f"{shape['minItems']} to {shape['maxItems']} " if "maxItems" in shape else ""
        return f"a list of {size}{what}"
    if kind == "object":
        keys = ", ".join(shape.get("properties", {}))
        return f"an object ({keys})" if keys else "an object"
    return "any value"
