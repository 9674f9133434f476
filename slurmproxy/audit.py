"""Audit records: exactly one JSON line per request, allowed or denied, written before the response.

A record says who (issuer, subject), as whom (local account and the mapping that chose it), what
(method, path, job id), by which rule, and the outcome (decision, reason, status). It never holds a
token, an Authorization header, a query string or a full claim set. Each record is written with a
single ``write(2)`` on an ``O_APPEND`` descriptor, so lines from several worker processes never
interleave.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from slurmproxy.settings import AuditSettings

SCHEMA = "slurmproxy.audit/1"
Decision = Literal["allow", "deny", "error"]


@dataclass
class AuditRecord:
    request_id: str
    method: str
    path: str
    client: str | None = None
    user_agent: str | None = None
    issuer: str | None = None
    subject: str | None = None
    entitlement: str | None = None
    rule: str | None = None
    operation: str | None = None
    mapping: str | None = None
    local_user: str | None = None
    mapping_detail: dict[str, Any] | None = None  # what the mapping backend adds: a pool lease, a stale ALISE answer
    decision: Decision = "error"
    reason: str = "internal_error"
    detail: str | None = None
    status: int = 500
    upstream_status: int | None = None
    job_id: int | None = None
    latency_ms: float = 0.0
    started: float = field(default_factory=time.perf_counter, repr=False)

    def to_json(self) -> str:
        data: dict[str, Any] = {"schema": SCHEMA, "time": datetime.now(UTC).isoformat(timespec="milliseconds")}
        data.update(asdict(self))
        data.pop("started")
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


class AuditWriteError(Exception):
    pass


class AuditLog:
    """Appends records to stdout or a file. Not buffered: a record is on disk when emit returns."""

    def __init__(self, settings: AuditSettings) -> None:
        self._settings = settings
        self._fd: int | None = None
        self.failures = 0
        self.records = 0

    def open(self) -> None:
        if self._settings.sink == "stdout":
            self._fd = 1
            return
        path: Path | None = self._settings.file
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def close(self) -> None:
        if self._fd is not None and self._fd > 2:
            os.close(self._fd)
        self._fd = None

    def emit(self, record: AuditRecord) -> None:
        record.latency_ms = round((time.perf_counter() - record.started) * 1000, 3)
        line = (record.to_json() + "\n").encode()
        try:
            if self._fd is None:
                raise OSError("audit log is not open")
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
        except OSError as exc:
            self.failures += 1
            raise AuditWriteError(f"cannot write the audit record: {exc}") from exc
        self.records += 1
