"""What the proxy knows about slurmrestd's paths and API versions, in one place.

slurmrestd serves versioned APIs under ``/<api>/<version>/…`` (``/slurm/v0.0.42/jobs``,
``/slurmdb/v0.0.42/accounts``) and its OpenAPI documents under ``/openapi…``. Job requests are
``POST /slurm/<version>/job/submit``, ``…/job/allocate`` and ``…/job/<job_id>`` (an update). Job
bodies come in two dialects: ``legacy`` (v0.0.36 to v0.0.38, Slurm 22.05 and older) and
``data_parser`` (v0.0.39 and later).

Path patterns, as written in policy files and the shield's cache rules, look like OpenAPI paths with
placeholders that hold across versions: ``{version}`` matches ``v0.0.36`` … ``v0.0.49``,
``{job_id}`` a numeric job id (array jobs as ``123_4``), ``{name}`` a node, partition, reservation,
account or user name. A trailing slash is optional (v0.0.38 lists ``/jobs/``, later versions
``/jobs``). Patterns compile once to anchored regular expressions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

OPENAPI_DOCUMENT = "/openapi/v3"
"""The OpenAPI document that lists every path slurmrestd serves (it wants credentials, but makes no RPC)."""
RESERVED_ROOTS = frozenset({"slurm", "slurmdb", "_slurmproxy"})
"""First path segments that belong to slurmrestd (plus ``openapi*``) or to the proxy's own endpoints."""

VERSION = re.compile(r"v([0-9]{1,4})\.([0-9]{1,4})\.([0-9]{1,4})")
NEWEST_LEGACY_VERSION = (0, 0, 38)
"""The last version with the legacy job dialect (Slurm 22.05): its errors also hide authentication failures."""

JobKind = Literal["submit", "allocate", "update"]
Dialect = Literal["legacy", "data_parser"]

PLACEHOLDERS = {
    "version": r"v0\.0\.(?:3[6-9]|4[0-9])",
    "job_id": r"[0-9]{1,10}(?:_[0-9]{1,10})?",
    "name": r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}",
}
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_LITERAL = re.compile(r"[A-Za-z0-9/._\-]*")
_JOB_REQUEST = re.compile(
    r"/slurm/(?P<version>v0\.0\.[0-9]{2})/job/(?P<what>submit|allocate|[0-9]{1,10}(?:_[0-9]{1,10})?)/?"
)
_JOB_IN_PATH = re.compile(r"/slurm(?:db)?/v0\.0\.[0-9]+/job/(?P<job>[0-9]{1,10})(?:_[0-9]{1,10})?/?")


def version_key(version: str) -> tuple[int, ...]:
    """``v0.0.42`` → ``(0, 0, 42)``, for ordering; ``(-1,)`` for anything that is not a version."""
    match = VERSION.fullmatch(version)
    return tuple(int(part) for part in match.groups()) if match else (-1,)


def is_legacy(version: str) -> bool:
    return version_key(version) <= NEWEST_LEGACY_VERSION


def requested_api(path: str) -> tuple[str, str] | None:
    """``("slurm", "v0.0.42")`` for ``/slurm/v0.0.42/jobs``; None for unversioned paths (``/openapi/v3``)."""
    parts = path.split("/", 3)
    if len(parts) >= 3 and parts[1] and VERSION.fullmatch(parts[2]):
        return parts[1], parts[2]
    return None


def is_reserved(path: str) -> bool:
    """Whether ``path`` lies under a slurmrestd API, its OpenAPI documents or the proxy's own endpoints."""
    first = path.strip("/").split("/")[0]
    return first in RESERVED_ROOTS or first == "" or first.startswith("openapi")


def dialect_of(version: str) -> Dialect:
    """``v0.0.38`` → legacy; ``v0.0.39`` and later → data_parser."""
    return "legacy" if is_legacy(version) else "data_parser"


@dataclass(frozen=True, slots=True)
class JobRequest:
    kind: JobKind
    version: str


def job_request(method: str, path: str) -> JobRequest | None:
    """The kind of job request (its body describes a job), or None for any other request."""
    if method != "POST":
        return None
    match = _JOB_REQUEST.fullmatch(path)
    if match is None:
        return None
    what = match.group("what")
    kind: JobKind = "submit" if what == "submit" else "allocate" if what == "allocate" else "update"
    return JobRequest(kind, match.group("version"))


_BULK_SIGNAL = re.compile(r"/slurm/v0\.0\.[0-9]{2}/jobs/?")


def takes_body(method: str, path: str) -> bool:
    """Whether slurmrestd reads a request body for this method and path.

    GET, HEAD and OPTIONS never have one; DELETE only for the bulk signal ``DELETE /slurm/<v>/jobs``
    (a ``kill_jobs_msg``, since Slurm 23.11.6); POST, PUT and PATCH may.
    """
    if method in ("GET", "HEAD", "OPTIONS"):
        return False
    if method == "DELETE":
        return _BULK_SIGNAL.fullmatch(path) is not None
    return True


def job_id_in_path(path: str) -> int | None:
    """The job a path names (``/slurm/v0.0.42/job/4711`` → 4711; an array task names its array job)."""
    match = _JOB_IN_PATH.fullmatch(path)
    return int(match["job"]) if match else None


def credential_probe_path(version: str) -> str:
    """A request that needs a credential and changes nothing: cancelling job 0, which never exists."""
    return f"/slurm/{version}/job/0"


def credential_probe(version: str) -> tuple[str, str]:
    """(method, path) of a cheap request to slurmctld that tells whether a credential is accepted.

    v0.0.38: ``DELETE …/job/0`` (2017 accepted, 5005 rejected). Later versions refuse job 0 in the
    path parser without asking slurmctld (422), so: ``GET …/licenses`` (200 accepted, 511 rejected).
    """
    if is_legacy(version):
        return "DELETE", credential_probe_path(version)
    return "GET", f"/slurm/{version}/licenses"


def compile_path(pattern: str) -> re.Pattern[str]:
    """A path pattern as an anchored regular expression; ValueError naming the problem."""
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
