from __future__ import annotations

import json
from pathlib import Path

import pytest

from slurmproxy.audit import SCHEMA, AuditLog, AuditRecord, AuditWriteError
from slurmproxy.settings import AuditSettings


def test_one_line_per_record_with_schema_and_latency(tmp_path: Path) -> None:
    log = AuditLog(AuditSettings(sink="file", file=tmp_path / "a" / "audit.log"))
    log.open()
    for n in range(3):
        log.emit(AuditRecord(request_id=f"r{n}", method="GET", path="/x", status=200, decision="allow"))
    log.close()
    lines = (tmp_path / "a" / "audit.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["request_id"] for r in records] == ["r0", "r1", "r2"]
    assert all(r["schema"] == SCHEMA and r["latency_ms"] >= 0 and r["time"].endswith("+00:00") for r in records)
    assert "started" not in records[0]
    assert log.records == 3


def test_write_failure_raises_and_is_counted() -> None:
    log = AuditLog(AuditSettings(sink="file", file=Path("/dev/full")))
    log.open()
    with pytest.raises(AuditWriteError):
        log.emit(AuditRecord(request_id="r", method="GET", path="/"))
    assert log.failures == 1
    log.close()


def test_emit_before_open_fails() -> None:
    with pytest.raises(AuditWriteError):
        AuditLog(AuditSettings()).emit(AuditRecord(request_id="r", method="GET", path="/"))
