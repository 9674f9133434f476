"""Reading audit logs for auditors: the current file and its rotated siblings, filters, and summaries.

Used by ``slurmproxy audit`` (slurmproxy/commands/audit.py). Records are read as written; lines that
are not ``slurmproxy.audit/1`` records (application log lines mixed into a container log, a torn
last line) are skipped and counted, never an error.

A request that changes state has two records: its intent, written before it was forwarded, and its
outcome. :func:`settled` shows each request once: the outcome, or, for an intent whose outcome never
came (the proxy stopped, or the outcome could not be written and went to the application log), the
intent itself, at the end (``kind: intent``, ``status: null``: slurmrestd may have acted).
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from slurmproxy.audit.file import rotated_files
from slurmproxy.audit.record import SCHEMA, pseudonym

Record = dict[str, Any]
SUMMARY_DIMENSIONS = ("decision", "status", "vo", "subject", "local_user", "rule", "reason", "kind")


def _open(path: Path) -> IO[str]:
    if path.name == "-":
        return sys.stdin
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def _record(line: str) -> Record | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else None


def _first_time(path: Path) -> str:
    with _open(path) as stream:
        for line in stream:
            record = _record(line)
            if record is not None:
                return str(record.get("time", ""))
    return ""


def audit_files(paths: Iterable[Path]) -> list[Path]:
    """Each named file with its rotated siblings, oldest first (by each file's first record); ``-`` is stdin."""
    files: dict[Path, None] = {}
    stdin = False
    for path in paths:
        if path.name == "-":
            stdin = True
            continue
        rotated = rotated_files(path)
        if not path.exists() and not rotated:
            raise FileNotFoundError(f"{path}: no such file")
        files.update(dict.fromkeys([*rotated, *([path] if path.exists() else [])]))
    ordered = sorted(files, key=lambda p: (_first_time(p), str(p)))
    return [*ordered, Path("-")] if stdin else ordered


@dataclass
class Reader:
    """Reads records from files in order and counts the lines that are not records."""

    skipped: int = 0

    def records(self, files: Iterable[Path]) -> Iterator[Record]:
        for path in files:
            with _open(path) as stream:
                for line in stream:
                    record = _record(line)
                    if record is None:
                        self.skipped += bool(line.strip())
                        continue
                    yield record


def kind_of(record: Record) -> str:
    """``request``, ``intent`` or ``outcome``; records written before kinds existed are requests."""
    return str(record.get("kind") or "request")


def _request_key(record: Record) -> tuple[Any, ...]:
    return tuple(record.get(name) for name in ("request_id", "method", "path", "issuer", "subject"))


def settled(records: Iterable[Record]) -> Iterator[Record]:
    """Each request once: an intent followed by its outcome is the outcome; an intent that never got one
    comes at the end, as written. Intents are paired with outcomes of the same request id, method,
    path and caller, oldest first (a client may reuse a request id)."""
    pending: dict[tuple[Any, ...], deque[Record]] = {}
    for record in records:
        kind = kind_of(record)
        if kind == "intent":
            pending.setdefault(_request_key(record), deque()).append(record)
            continue
        if kind == "outcome":
            key = _request_key(record)
            waiting = pending.get(key)
            if waiting:
                waiting.popleft()
                if not waiting:
                    del pending[key]
        yield record
    unanswered = sorted((r for waiting in pending.values() for r in waiting), key=lambda r: str(r.get("time", "")))
    yield from unanswered


@dataclass
class Query:
    since: datetime | None = None
    until: datetime | None = None
    subjects: set[str] = field(default_factory=set)
    issuers: set[str] = field(default_factory=set)
    users: set[str] = field(default_factory=set)
    vos: set[str] = field(default_factory=set)
    decisions: set[str] = field(default_factory=set)
    job_ids: set[int] = field(default_factory=set)
    rules: set[str] = field(default_factory=set)
    statuses: set[int] = field(default_factory=set)
    operations: set[str] = field(default_factory=set)
    request_ids: set[str] = field(default_factory=set)
    pseudonym_key: bytes | None = None

    def _subject_matches(self, record: Record) -> bool:
        subject = record.get("subject")
        if subject in self.subjects:
            return True
        if self.pseudonym_key is None or not isinstance(subject, str):
            return False
        issuer = str(record.get("issuer") or "")
        return any(pseudonym(self.pseudonym_key, issuer, s) == subject for s in self.subjects)

    def _time_matches(self, record: Record) -> bool:
        if self.since is None and self.until is None:
            return True
        try:
            when = datetime.fromisoformat(str(record.get("time")))
        except ValueError:
            return False
        return (self.since is None or when >= self.since) and (self.until is None or when < self.until)

    def matches(self, record: Record) -> bool:
        checks: list[tuple[set[Any], Any]] = [
            (self.issuers, record.get("issuer")),
            (self.users, record.get("local_user")),
            (self.decisions, record.get("decision")),
            (self.job_ids, record.get("job_id")),
            (self.rules, record.get("rule")),
            (self.statuses, record.get("status")),
            (self.operations, record.get("operation")),
            (self.request_ids, record.get("request_id")),
        ]
        if any(wanted and value not in wanted for wanted, value in checks):
            return False
        if self.vos and record.get("vo") not in self.vos and not self.vos & set(record.get("vos") or ()):
            return False
        if self.subjects and not self._subject_matches(record):
            return False
        return self._time_matches(record)


def _key(record: Record, dimension: str) -> str:
    if dimension == "kind":
        return kind_of(record)
    value = record.get(dimension)
    if dimension == "subject" and value is not None:
        return f"{value} ({record.get('issuer')})"
    return "-" if value is None or value == "" else str(value)


@dataclass
class Summary:
    total: int = 0
    first: str | None = None
    last: str | None = None
    counts: dict[str, Counter[str]] = field(default_factory=lambda: {d: Counter() for d in SUMMARY_DIMENSIONS})

    def add(self, record: Record) -> None:
        self.total += 1
        when = str(record.get("time", ""))
        self.first = when if self.first is None or when < self.first else self.first
        self.last = when if self.last is None or when > self.last else self.last
        for dimension, counter in self.counts.items():
            counter[_key(record, dimension)] += 1

    def as_dict(self) -> dict[str, Any]:
        by = {f"by_{d}": dict(c.most_common()) for d, c in self.counts.items()}
        return {"total": self.total, "first": self.first, "last": self.last, **by}
