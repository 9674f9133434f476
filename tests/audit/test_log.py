from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from slurmproxy.audit.log import AuditLog, AuditTrail
from slurmproxy.audit.record import AuditRecord
from slurmproxy.config.settings import AuditSettings
from slurmproxy.errors import AuditWriteError, RequestTimeoutError
from slurmproxy.observability.metrics import RequestOutcome


class Observer:
    def __init__(self) -> None:
        self.writes: list[bool] = []

    def audit_write(self, ok: bool) -> None:
        self.writes.append(ok)


def test_write_failure_raises_and_is_counted() -> None:
    observer = Observer()
    log = AuditLog(AuditSettings(sink="file", file=Path("/dev/full"), max_bytes=0), observer)
    log.open()
    with pytest.raises(AuditWriteError):
        log.emit(AuditRecord(request_id="r", method="GET", path="/"))
    assert observer.writes == [False]
    log.close()


def test_write_failure_with_fail_open_logs_the_record_and_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    observer = Observer()
    log = AuditLog(AuditSettings(sink="file", file=Path("/dev/full"), max_bytes=0, fail_closed=False), observer)
    log.open()
    with caplog.at_level(logging.ERROR, logger="slurmproxy.audit"):
        log.emit(AuditRecord(request_id="kept-in-the-log", method="GET", path="/"))
    log.close()
    assert observer.writes == [False]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "No space left on device" in message and '"request_id":"kept-in-the-log"' in message


def test_stdout_sink_writes_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    log = AuditLog(AuditSettings())
    log.open()
    log.emit(AuditRecord(request_id="to-stdout", method="GET", path="/"))
    log.close()
    out = capfd.readouterr().out
    assert out.count("\n") == 1 and json.loads(out)["request_id"] == "to-stdout"


def test_emit_before_open_fails() -> None:
    with pytest.raises(AuditWriteError):
        AuditLog(AuditSettings()).emit(AuditRecord(request_id="r", method="GET", path="/"))


class Requests:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str]] = []

    def observe_request(self, record: RequestOutcome) -> None:
        self.seen.append((record.decision, record.status, record.reason))


@pytest.mark.anyio
async def test_trail_writes_then_counts_every_record(tmp_path: Path) -> None:
    log = AuditLog(AuditSettings(sink="file", file=tmp_path / "audit.log"))
    log.open()
    metrics = Requests()
    record = AuditRecord.begin("r", "GET", "/slurm/v0.0.40/ping")
    record.allow(200)
    assert await AuditTrail(log, metrics).finish(record) is None
    log.close()
    assert metrics.seen == [("allow", 200, "allowed")]
    assert json.loads((tmp_path / "audit.log").read_text())["request_id"] == "r"


@pytest.mark.anyio
async def test_trail_turns_an_unwritable_record_into_the_refusal_the_client_gets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = AuditLog(AuditSettings(sink="file", file=Path("/dev/full"), max_bytes=0))
    log.open()
    metrics = Requests()
    record = AuditRecord.begin("r", "GET", "/slurm/v0.0.40/ping")
    record.allow(200)
    with caplog.at_level(logging.ERROR, logger="slurmproxy.audit"):
        refusal = await AuditTrail(log, metrics).finish(record)
    log.close()
    assert isinstance(refusal, AuditWriteError) and refusal.status_code == 503
    assert metrics.seen == [("error", 503, "audit_unavailable")]
    assert any("refusing the request" in r.getMessage() for r in caplog.records)


def test_trail_keeps_the_refusal_of_a_connection_the_server_refuses(caplog: pytest.LogCaptureFixture) -> None:
    log = AuditLog(AuditSettings(sink="file", file=Path("/dev/full"), max_bytes=0))
    log.open()
    metrics = Requests()
    record = AuditRecord.begin("r", "-", "/")
    record.refuse(RequestTimeoutError("too slow", reason="header_timeout"))
    AuditTrail(log, metrics).finish_nowait(record)
    log.close()  # writes what is queued first
    assert metrics.seen == [("deny", 408, "header_timeout")]
    assert any("refused connection" in r.getMessage() for r in caplog.records)
