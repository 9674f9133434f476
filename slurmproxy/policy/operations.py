"""Operations: HTTP method + slurmrestd path patterns, and the built-in named groups of them.

A path pattern is written like an OpenAPI path, with placeholders that work across slurmrestd API
versions: ``{version}`` matches ``v0.0.36`` … ``v0.0.49``, ``{job_id}`` a numeric job id (array
jobs as ``123_4``), ``{name}`` a node, partition, reservation, account or user name. A trailing
slash is optional (v0.0.38 lists ``/jobs/``, later versions ``/jobs``). Patterns compile once,
at load time, to anchored regular expressions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

PLACEHOLDERS = {
    "version": r"v0\.0\.(?:3[6-9]|4[0-9])",
    "job_id": r"[0-9]{1,10}(?:_[0-9]{1,10})?",
    "name": r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}",
}
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_LITERAL = re.compile(r"[A-Za-z0-9/._\-]*")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})


def compile_path(pattern: str) -> re.Pattern[str]:
    if not pattern.startswith("/"):
        raise ValueError(f"path pattern must start with '/': {pattern!r}")
    out = []
    pos = 0
    for match in _PLACEHOLDER.finditer(pattern):
        literal = pattern[pos : match.start()]
        if not _LITERAL.fullmatch(literal):
            raise ValueError(f"path pattern has characters outside [A-Za-z0-9/._-]: {pattern!r}")
        out.append(re.escape(literal))
        name = match.group(1)
        if name not in PLACEHOLDERS:
            raise ValueError(f"unknown placeholder {{{name}}} in {pattern!r}; known: {sorted(PLACEHOLDERS)}")
        out.append(f"(?P<{name}>{PLACEHOLDERS[name]})")
        pos = match.end()
    tail = pattern[pos:]
    if not _LITERAL.fullmatch(tail):
        raise ValueError(f"path pattern has characters outside [A-Za-z0-9/._-]: {pattern!r}")
    out.append(re.escape(tail.rstrip("/")))
    return re.compile("".join(out) + "/?")


@dataclass(frozen=True)
class Operation:
    """One allowed (methods, path pattern) pair."""

    methods: frozenset[str]
    pattern: str
    regex: re.Pattern[str]
    group: str

    def matches(self, method: str, path: str) -> re.Match[str] | None:
        if method not in self.methods:
            return None
        return self.regex.fullmatch(path)


def operation(methods: Iterable[str], pattern: str, group: str) -> Operation:
    upper = frozenset(m.upper() for m in methods)
    unknown = upper - METHODS
    if unknown:
        raise ValueError(f"unknown HTTP method(s): {', '.join(sorted(unknown))}")
    return Operation(upper, pattern, compile_path(pattern), group)


_SLURM_READ = [
    "/slurm/{version}/ping",
    "/slurm/{version}/diag",
    "/slurm/{version}/jobs",
    "/slurm/{version}/jobs/state",
    "/slurm/{version}/job/{job_id}",
    "/slurm/{version}/nodes",
    "/slurm/{version}/node/{name}",
    "/slurm/{version}/partitions",
    "/slurm/{version}/partition/{name}",
    "/slurm/{version}/reservations",
    "/slurm/{version}/reservation/{name}",
    "/slurm/{version}/licenses",
    "/slurm/{version}/shares",
]
_SLURMDB_READ = [
    "/slurmdb/{version}/jobs",
    "/slurmdb/{version}/job/{job_id}",
    "/slurmdb/{version}/accounts",
    "/slurmdb/{version}/account/{name}",
    "/slurmdb/{version}/associations",
    "/slurmdb/{version}/users",
    "/slurmdb/{version}/user/{name}",
    "/slurmdb/{version}/qos",
    "/slurmdb/{version}/tres",
    "/slurmdb/{version}/clusters",
    "/slurmdb/{version}/config",
    "/slurmdb/{version}/diag",
    "/slurmdb/{version}/wckeys",
]
_OPENAPI = ["/openapi", "/openapi.json", "/openapi.yaml", "/openapi/v3"]

BUILTIN_GROUPS: dict[str, str] = {
    "ping": "check that slurmctld answers",
    "read-only": "read jobs, nodes, partitions, reservations, licenses, shares and diagnostics",
    "read-accounting": "read slurmdbd accounting (jobs, accounts, associations, users, QOS)",
    "openapi": "read slurmrestd's OpenAPI documents",
    "submit": "submit batch jobs",
    "update-own": "modify jobs (Slurm allows only the job's owner)",
    "cancel-own": "cancel or signal jobs (Slurm allows only the job's owner)",
}


def builtin_operations() -> dict[str, tuple[Operation, ...]]:
    get = ["GET", "HEAD"]
    groups: dict[str, tuple[Operation, ...]] = {
        "ping": (operation(get, "/slurm/{version}/ping", "ping"),),
        "read-only": tuple(operation(get, p, "read-only") for p in _SLURM_READ),
        "read-accounting": tuple(operation(get, p, "read-accounting") for p in _SLURMDB_READ),
        "openapi": tuple(operation(get, p, "openapi") for p in _OPENAPI),
        "submit": (operation(["POST"], "/slurm/{version}/job/submit", "submit"),),
        "update-own": (operation(["POST"], "/slurm/{version}/job/{job_id}", "update-own"),),
        "cancel-own": (operation(["DELETE"], "/slurm/{version}/job/{job_id}", "cancel-own"),),
    }
    return groups
