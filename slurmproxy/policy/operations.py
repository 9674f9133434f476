"""Operations: HTTP method + slurmrestd path patterns, and the built-in named groups of them.

Path patterns and their placeholders are described in :mod:`slurmproxy.core.slurmrest`; they compile
once, at load time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from slurmproxy.core.slurmrest import compile_path

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})


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
