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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from slurmproxy.core.entitlements import parse as parse_entitlement
from slurmproxy.core.principal import Principal
from slurmproxy.core.slurmrest import job_id_in_path
from slurmproxy.errors import ConfigError, ProxyError, RuleRef

SCHEMA = "slurmproxy.audit/1"
Decision = Literal["allow", "deny", "error"]
Kind = Literal["request", "intent", "outcome"]
MAX_LINE_BYTES = 4000  # below PIPE_BUF (4096): one write to a pipe is atomic
MAX_VOS = 16
MIN_KEY_BYTES = 16
PSEUDONYM_PREFIX = "hmac:"
MAX_PATH = 512
MAX_USER_AGENT = 256
_LIMITS = {"user_agent": 256, "detail": 512, "entitlement": 512, "vo": 256, "subject": 512, "issuer": 512}


def elapsed_ms(since: float) -> float:
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
    kind: Kind = "request"  # intent: before a state-changing request is forwarded; outcome: its final record
    started: float = field(default_factory=time.perf_counter, repr=False)

    @classmethod
    def begin(
        cls,
        request_id: str,
        method: str,
        path: str,
        *,
        client: str | None = None,
        peer: str | None = None,
        user_agent: str | None = None,
        operation: str | None = None,
    ) -> AuditRecord:
        """The record of a request (or an admin action) as it starts: denied as an internal error until
        it is allowed or refused."""
        return cls(
            request_id=request_id,
            method=method,
            path=path[:MAX_PATH] or "-",
            client=client,
            peer=peer,
            user_agent=(user_agent or "")[:MAX_USER_AGENT] or None,
            operation=operation,
        )

    def set_principal(self, principal: Principal) -> None:
        """Who: issuer, subject, and the VOs (groups of AARC entitlements) the caller holds."""
        self.issuer, self.subject = principal.issuer, principal.subject
        self.vos = principal.vos[:MAX_VOS]

    def set_rule(self, ref: RuleRef) -> None:
        """By which rule, operation and entitlement (and so which VO) the request was allowed."""
        self.rule, self.operation, self.entitlement = ref.rule, ref.operation, ref.entitlement
        parsed = parse_entitlement(ref.entitlement) if ref.entitlement else None
        self.vo = parsed.group if parsed else None

    def allow(self, status: int) -> None:
        self.status, self.decision, self.reason, self.detail = status, "allow", "allowed", None

    def refuse(self, error: ProxyError) -> None:
        """The one refusal path: a refusal below 500 is a denial, from 500 on an error (a dependency or
        the proxy failed). What the refusing stage had already decided is kept."""
        self.status, self.reason, self.detail = error.status_code, error.reason, error.detail
        self.decision = "deny" if error.status_code < 500 else "error"
        if error.rule is not None:
            self.set_rule(error.rule)
        if error.upstream_status is not None:
            self.upstream_status = error.upstream_status

    def intent(self) -> AuditRecord:
        """The intent record of this request, as it is about to be forwarded: who, as whom, what, by which
        rule; allowed, with no status yet (its outcome record, with the same request id, follows)."""
        intent = replace(self, kind="intent")
        intent.allow(0)
        intent.upstream_status, intent.upstream_ms, intent.served_from = None, None, None
        return intent

    @contextmanager
    def upstream_timer(self) -> Iterator[None]:
        """Times the call to slurmrestd (until its response headers), whether it succeeds or not."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.upstream_ms = elapsed_ms(started)

    def data(self, pseudonym_key: bytes | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"schema": SCHEMA, "time": datetime.now(UTC).isoformat(timespec="milliseconds")}
        # A shallow copy (dataclasses.asdict deep-copies, at a fifth of a forwarded request's CPU time).
        for name in _FIELDS:
            data[name] = getattr(self, name)
        if data["mapping_detail"] is not None:
            data["mapping_detail"] = dict(data["mapping_detail"])
        if data["job_id"] is None:
            data["job_id"] = job_id_in_path(self.path)
        if self.kind == "intent":
            data["status"] = None  # not answered yet
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
