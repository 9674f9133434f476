"""Writing audit records: one JSON line per request, before the response starts, and for a request
that changes state (POST, PUT, PATCH, DELETE) also one before it is forwarded.

Each record is written with a single ``write(2)``: to stdout (lines are kept under ``PIPE_BUF``, so
several workers writing to one pipe never interleave) or to a file (see :mod:`slurmproxy.audit.file`).
In the running proxy the writes happen in a thread of their own (:mod:`slurmproxy.audit.writer`), so a
stalled sink never blocks the event loop; ``emit`` writes at once (the command-line tools).

:class:`AuditTrail` is the one place a request's records are written and counted in the metrics:

* ``intend``: the **intent** record of a state-changing request, written before it is forwarded
  (``kind: intent``: who, as whom, what, by which rule; no outcome yet). If it cannot be written the
  request is refused (503, ``audit.fail_closed``) and slurmrestd never sees it;
* ``finish``: the final record, ``kind: outcome`` after an intent, else ``kind: request``. An outcome
  that cannot be written does **not** refuse the request: slurmrestd has acted, and its answer (a job
  id) must reach the client, or a retry would act twice; the intent record is in the log, and the
  outcome goes to the application log instead and is counted. Any other record that cannot be
  written refuses the request (503), as before.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

from slurmproxy.audit.file import AuditFile
from slurmproxy.audit.record import MAX_LINE_BYTES, AuditRecord, elapsed_ms, read_pseudonym_key
from slurmproxy.audit.writer import AuditWriter
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
        self._writer: AuditWriter | None = None  # started at the first asynchronous write

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
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._sink is not None:
            self._sink.close()
        self._sink = None

    def _thread(self) -> AuditWriter:
        if self._sink is None:
            raise OSError("audit log is not open")
        if self._writer is None:
            self._writer = AuditWriter(
                self._sink.write,
                max_queued=self._settings.queue_size,
                wait_seconds=self._settings.write_timeout_seconds,
            )
        return self._writer

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

    def _line(self, record: AuditRecord) -> bytes:
        record.latency_ms = elapsed_ms(record.started)
        return record.to_line(self._key)

    def _written(self) -> None:
        if self._observer is not None:
            self._observer.audit_write(True)

    def _not_written(self, exc: OSError, line: bytes, *, must: bool) -> None:
        """Count it; refuse (AuditWriteError) if the record must be written and ``fail_closed``; else keep
        the record in the application log."""
        if self._observer is not None:
            self._observer.audit_write(False)
        if must and self._settings.fail_closed:
            raise AuditWriteError(f"cannot write the audit record: {exc}") from exc
        why = "audit.fail_closed is false" if must else "the request was answered"
        logger.error("cannot write the audit record (%s); %s: %s", exc, why, line.decode().rstrip())

    def emit(self, record: AuditRecord) -> None:
        """Write now, in this thread (the command-line tools; the proxy uses :meth:`write`)."""
        line = self._line(record)
        try:
            if self._sink is None:
                raise OSError("audit log is not open")
            self._sink.write(line)
        except OSError as exc:
            self._not_written(exc, line, must=True)
            return
        self._written()

    async def write(self, record: AuditRecord, *, must: bool = True) -> None:
        """Write in the writer thread and wait for it (never blocking the loop); see :meth:`_not_written`
        for a record that cannot be written."""
        line = self._line(record)
        try:
            await self._thread().write(line)
        except OSError as exc:
            self._not_written(exc, line, must=must)
            return
        self._written()

    def post(self, record: AuditRecord) -> None:
        """Queue the record without waiting (a refusal the server sends from a protocol callback)."""
        line = self._line(record)

        def failed(exc: OSError) -> None:
            if self._observer is not None:
                self._observer.audit_write(False)
            logger.warning("could not write the audit record of a refused connection (%s): %s", exc, record.reason)

        try:
            self._thread().post(line, failed)
        except OSError as exc:
            failed(exc)


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

    async def intend(self, record: AuditRecord) -> None:
        """Write the intent record of a request about to be forwarded; raise AuditWriteError (503, nothing
        forwarded) if it cannot be written. The request's final record is then its outcome."""
        try:
            await self.log.write(record.intent())
        except AuditWriteError as exc:
            logger.error("%s; refusing the request before it is forwarded", exc.detail)
            raise AuditWriteError(self.REFUSAL) from None
        record.kind = "outcome"

    async def finish(self, record: AuditRecord) -> AuditWriteError | None:
        """Write and count the final record. If it cannot be written (and ``audit.fail_closed``), the
        refusal the client must get instead of its answer; the record, counted as that refusal, says so.
        An outcome (its intent was written, slurmrestd was asked) is never turned into a refusal: the
        client gets slurmrestd's answer and the outcome goes to the application log."""
        refusal: AuditWriteError | None = None
        try:
            await self.log.write(record, must=record.kind != "outcome")
        except AuditWriteError as exc:
            logger.error("%s; refusing the request", exc.detail)
            refusal = AuditWriteError(self.REFUSAL)
            record.refuse(refusal)
        self._metrics.observe_request(record)
        return refusal

    def finish_nowait(self, record: AuditRecord) -> None:
        """Queue and count the record of a request the server refuses before the app saw it (it keeps its
        refusal; the record is written in the background)."""
        self.log.post(record)
        self._metrics.observe_request(record)
