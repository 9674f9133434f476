"""Audit records: exactly one JSON line per request, allowed or denied, written before the response.

A record says who (issuer, subject, their VOs), as whom (local account and the mapping that chose
it), what (method, path, job id), by which rule and entitlement, and the outcome (decision, reason,
status). It never holds a token, an Authorization header, a query string or a claim set. The
schema is versioned and documented in docs/audit.md (JSON Schema: docs/audit.schema.json).

Each record is written with a single ``write(2)``: to stdout (lines are kept under ``PIPE_BUF``, so
several workers writing to one pipe never interleave) or to a file (see :mod:`slurmproxy.auditfile`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from slurmproxy.auditfile import AuditFile
from slurmproxy.entitlements import parse as parse_entitlement
from slurmproxy.errors import DependencyError
from slurmproxy.settings import AuditSettings, ConfigError

if TYPE_CHECKING:
    from slurmproxy.policy.rules import Decision as PolicyDecision
    from slurmproxy.tokens import Principal

logger = logging.getLogger("slurmproxy.audit")

SCHEMA = "slurmproxy.audit/1"
Decision = Literal["allow", "deny", "error"]
MAX_LINE_BYTES = 4000  # below PIPE_BUF (4096): one write to a pipe is atomic
ROOM_BYTES = 4 * MAX_LINE_BYTES  # free space below which requests are refused before forwarding (fail_closed)
MAX_VOS = 16
MIN_KEY_BYTES = 16
PSEUDONYM_PREFIX = "hmac:"
_JOB_PATH = re.compile(r"/slurm(?:db)?/v0\.0\.[0-9]+/job/(?P<job>[0-9]{1,10})(?:_[0-9]{1,10})?/?")
_LIMITS = {"user_agent": 256, "detail": 512, "entitlement": 512, "vo": 256, "subject": 512, "issuer": 512}


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)


@dataclass
class AuditRecord:
    request_id: str
    method: str
    path: str
    client: str | None = None
    peer: str | None = None
    user_agent: str | None = None
    issuer: str | None = None
    subject: str | None = None
    vo: str | None = None
    vos: list[str] = field(default_factory=list)
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
    upstream_ms: float | None = None
    served_from: Literal["upstream", "coalesced", "cache"] | None = None  # see shield.py; null if not forwarded
    started: float = field(default_factory=time.perf_counter, repr=False)

    def set_principal(self, principal: Principal) -> None:
        """Who: issuer, subject, and the VOs (groups of AARC entitlements) the caller holds."""
        self.issuer, self.subject = principal.issuer, principal.subject
        self.vos = sorted({e.group for e in principal.parsed_entitlements})[:MAX_VOS]

    def set_decision(self, decision: PolicyDecision) -> None:
        """By which rule, operation and entitlement (and so which VO) the request was allowed."""
        self.rule = decision.rule.id if decision.rule else None
        self.operation = decision.operation.group if decision.operation else None
        self.entitlement = decision.entitlement
        parsed = parse_entitlement(decision.entitlement) if decision.entitlement else None
        self.vo = parsed.group if parsed else None

    @contextmanager
    def upstream_timer(self) -> Iterator[None]:
        """Times the call to slurmrestd (until its response headers), whether it succeeds or not."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.upstream_ms = _ms(started)

    def data(self, pseudonym_key: bytes | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"schema": SCHEMA, "time": datetime.now(UTC).isoformat(timespec="milliseconds")}
        # A shallow copy (dataclasses.asdict deep-copies, at a fifth of a forwarded request's CPU time).
        for name in _FIELDS:
            data[name] = getattr(self, name)
        if data["mapping_detail"] is not None:
            data["mapping_detail"] = dict(data["mapping_detail"])
        if data["job_id"] is None and (match := _JOB_PATH.fullmatch(self.path)):
            data["job_id"] = int(match["job"])
        for name, limit in _LIMITS.items():
            if isinstance(data[name], str):
                data[name] = data[name][:limit]
        data["vos"] = [vo[:128] for vo in data["vos"]]
        if pseudonym_key is not None and self.subject is not None:
            data["subject"] = pseudonym(pseudonym_key, self.issuer or "", self.subject)
        detail = data["mapping_detail"]
        if pseudonym_key is not None and isinstance(detail, dict) and isinstance(detail.get("subject"), str):
            detail["subject"] = pseudonym(
                pseudonym_key, str(detail.get("issuer") or self.issuer or ""), detail["subject"]
            )
        return data

    def to_line(self, pseudonym_key: bytes | None = None) -> bytes:
        """The record as one JSON line of at most MAX_LINE_BYTES, shortening the longest free-text fields."""
        data = self.data(pseudonym_key)
        line = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        for name in ("vos", "detail", "user_agent", "entitlement", "path"):
            if len(line) <= MAX_LINE_BYTES:
                break
            data[name] = [] if name == "vos" else (data[name] or "")[:64] or None
            line = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        return line


_FIELDS = tuple(f.name for f in fields(AuditRecord) if f.name != "started")


def pseudonym(key: bytes, issuer: str, subject: str) -> str:
    """A keyed hash of (issuer, subject): the same person always gets the same pseudonym; without the key it
    cannot be reversed or recomputed. The same subject from two issuers is two people, so two pseudonyms."""
    digest = hmac.new(key, f"{issuer}\n{subject}".encode(), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:32]


def read_pseudonym_key(path: Path) -> bytes:
    """The pseudonymisation key, used exactly as the file's bytes. Raises ConfigError (never showing the key)."""
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"audit.pseudonym_key_file: cannot read {path}: {exc.strerror}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"audit.pseudonym_key_file: {path} holds fewer than {MIN_KEY_BYTES} bytes")
    return key


class AuditWriteError(Exception):
    pass


class AuditObserver(Protocol):
    def audit_write(self, ok: bool) -> None: ...


class _Stdout:
    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def write(self, line: bytes) -> None:
        written = os.write(1, line)
        if written != len(line):
            raise OSError(f"short write ({written} of {len(line)} bytes)")


class AuditLog:
    """Writes records to the configured sink. Not buffered: a record is written when emit returns.

    A write failure is counted; with ``fail_closed`` (the default) emit raises AuditWriteError and the
    request is refused; otherwise the record goes to the application log instead and the request goes on.
    """

    def __init__(self, settings: AuditSettings, observer: AuditObserver | None = None) -> None:
        self._settings = settings
        self._observer = observer
        self._sink: _Stdout | AuditFile | None = None
        self._key: bytes | None = None
        self.failures = 0
        self.records = 0

    def open(self) -> None:
        if self._settings.pseudonym_key_file is not None:
            self._key = read_pseudonym_key(self._settings.pseudonym_key_file)
        if self._settings.sink == "stdout":
            self._sink = _Stdout()
            return
        assert self._settings.file is not None
        sink = AuditFile(self._settings.file, max_bytes=self._settings.max_bytes, keep=self._settings.keep)
        sink.open()
        self._sink = sink

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
        self._sink = None

    def check_room(self) -> None:
        """Called before a request is forwarded: with ``fail_closed``, refuse it (503 ``audit_unavailable``)
        when the audit file's filesystem is read-only or nearly full. Otherwise slurmrestd would act on
        it (a job submitted) and only then would the record fail to be written."""
        if not self._settings.fail_closed or not isinstance(self._sink, AuditFile):
            return
        if not self._sink.has_room(ROOM_BYTES):
            raise DependencyError(
                "the audit log cannot take more records (its filesystem is full or read-only); refusing "
                "before anything is forwarded",
                reason="audit_unavailable",
            )

    def emit(self, record: AuditRecord) -> None:
        record.latency_ms = _ms(record.started)
        line = record.to_line(self._key)
        try:
            if self._sink is None:
                raise OSError("audit log is not open")
            self._sink.write(line)
        except OSError as exc:
            self.failures += 1
            if self._observer is not None:
                self._observer.audit_write(False)
            if self._settings.fail_closed:
                raise AuditWriteError(f"cannot write the audit record: {exc}") from exc
            logger.error("cannot write the audit record (%s); audit.fail_closed is false: %s", exc, line.decode())
            return
        self.records += 1
        if self._observer is not None:
            self._observer.audit_write(True)
