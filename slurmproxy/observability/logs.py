"""Application logging (stderr), plain or JSON lines. Audit records are separate (see audit.py).

A line logged while a request is handled carries its request id (``request_id`` in JSON lines,
``[id]`` in plain ones), the same id as in the audit record, the response and slurmrestd's request.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

from slurmproxy.config.settings import LogSettings

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("slurmproxy_request_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()  # formatting runs in the logging call's context
        if request_id is not None:
            data["request_id"] = request_id
        if record.exc_info and record.exc_info[0] is not None:
            data["exception"] = record.exc_info[0].__name__
        return json.dumps(data, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = request_id_var.get()
        return text if request_id is None else f"{text} [{request_id}]"


def configure_logging(settings: LogSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # psycopg: the PostgreSQL pool's reconnection warnings (shared state), in the same format as ours.
    for name in ("slurmproxy", "uvicorn", "uvicorn.error", "psycopg"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(settings.level)
        log.propagate = False
