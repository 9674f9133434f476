"""Writing audit records: exactly one JSON line per request, before the response starts.

Each record is written with a single ``write(2)``: to stdout (lines are kept under ``PIPE_BUF``, so
several workers writing to one pipe never interleave) or to a file (see :mod:`slurmproxy.audit.file`).
:class:`AuditTrail` is the one place a request's record is finished: written, and counted in the
metrics.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

from slurmproxy.audit.file import AuditFile
from slurmproxy.audit.record import MAX_LINE_BYTES, AuditRecord, elapsed_ms, read_pseudonym_key
from slurmproxy.config.settings import AuditSettings
from slurmproxy.errors import AuditWriteError, DependencyError
from slurmproxy.observability.metrics import RequestOutcome

logger = logging.getLogger("slurmproxy.audit")
ROOM_BYTES = 4 * MAX_LINE_BYTES  # free space below which requests are refused before forwarding (fail_closed)


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
        record.latency_ms = elapsed_ms(record.started)
        line = record.to_line(self._key)
        try:
            if self._sink is None:
                raise OSError("audit log is not open")
            self._sink.write(line)
        except OSError as exc:
            if self._observer is not None:
                self._observer.audit_write(False)
            if self._settings.fail_closed:
                raise AuditWriteError(f"cannot write the audit record: {exc}") from exc
            logger.error("cannot write the audit record (%s); audit.fail_closed is false: %s", exc, line.decode())
            return
        if self._observer is not None:
            self._observer.audit_write(True)


class RequestObserver(Protocol):
    def observe_request(self, record: RequestOutcome) -> None: ...


class AuditTrail:
    """Where every request's record ends: written to the audit log, then counted in the metrics."""

    REFUSAL = "the audit log cannot be written; refusing to answer"

    def __init__(self, log: AuditLog, metrics: RequestObserver) -> None:
        self.log = log
        self._metrics = metrics

    def check_room(self) -> None:
        self.log.check_room()

    def finish(self, record: AuditRecord, *, refusable: bool = True) -> AuditWriteError | None:
        """Write and count the record. If it cannot be written (and ``audit.fail_closed``), the refusal
        the client must get instead of its answer; the record, counted as that refusal, says so. A
        request that is being refused already (``refusable=False``: a connection the server refuses) keeps
        its refusal."""
        refusal: AuditWriteError | None = None
        try:
            self.log.emit(record)
        except AuditWriteError as exc:
            if refusable:
                logger.error("%s; refusing the request", exc.detail)
                refusal = AuditWriteError(self.REFUSAL)
                record.refuse(refusal)
            else:
                logger.warning("could not write the audit record of a refused connection (%s)", record.reason)
        self._metrics.observe_request(record)
        return refusal
