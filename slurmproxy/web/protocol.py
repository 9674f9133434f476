"""The HTTP server's defences against slow and abusive clients.

uvicorn (httptools) limits neither the time a client may take to send its headers nor their size:
a connection that sends one header byte every few seconds, or never sends anything, stays open for
ever, and a client may send megabytes of headers. :class:`GuardedHttpToolsProtocol` adds, per
connection:

* a **header deadline** (``server.header_timeout_seconds``): from the connection's start, and
  from the first byte after each response, the request line and headers must be complete in
  time. A connection that sent part of a request then gets 408 and is closed; one that sent
  nothing is closed silently. Idle keep-alive connections close after ``server.keep_alive_seconds``
  (uvicorn's own timer);
* a **header size limit** (``server.max_header_bytes``, request line plus headers): 431, close;
* a **connection cap** (``server.max_connections``, per worker): beyond it, requests get 503 with
  ``Retry-After`` instead of queueing;
* malformed HTTP (a bare CR or LF, obs-fold, a NUL in a header, ``Content-Length`` with
  ``Transfer-Encoding``...) gets a JSON 400 instead of uvicorn's text one.

Each of these answers is JSON in slurmrestd's ``errors`` shape and has its audit record (reasons
``header_timeout``, ``header_too_large``, ``overloaded``, ``bad_http``), except a connection that
never sent a byte. :class:`BodyDeadline` bounds the time to receive a request body once the proxy
starts reading it (``server.body_timeout_seconds``; 408, reason ``body_timeout``).

WebSocket upgrades are disabled (``ws: none``): slurmrestd has no WebSocket endpoint.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from slurmproxy.config.settings import Settings
from slurmproxy.errors import (
    BadRequestError,
    DependencyError,
    HeadersTooLargeError,
    ProxyError,
    RequestTimeoutError,
)
from slurmproxy.web.replies import error_reply
from slurmproxy.web.request import record_for, request_id_of, runtime_of, server_settings

logger = logging.getLogger("slurmproxy.httpserver")
PROTOCOL = "slurmproxy.web.protocol:GuardedHttpToolsProtocol"
HOOKS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "on_response_complete",
    "send_400_response",
)
"""The methods of uvicorn's protocol this module overrides (tests/web check they still exist there)."""


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; ``send_400_response`` then sends the refusal."""


def _audit_refusal(
    state: dict[str, Any],
    headers: list[tuple[bytes, bytes]],
    error: ProxyError,
    *,
    request_id: str,
    method: str,
    path: str,
    peer: str | None,
) -> None:
    """The audit record (and the metrics) of a request refused before the proxy saw it."""
    runtime = runtime_of(state)
    if runtime is None:
        return
    record = record_for(headers, runtime.settings.server, request_id=request_id, method=method, path=path, peer=peer)
    record.refuse(error)
    runtime.trail.finish_nowait(record)


async def _overloaded(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app that answers requests beyond ``server.max_connections``."""
    request_id = request_id_of(scope["headers"], server_settings(scope["state"]))
    error = DependencyError(
        "the proxy has too many open connections (server.max_connections); retry later",
        reason="overloaded",
        headers={"Retry-After": "1", "Connection": "close"},
    )
    client = scope.get("client")
    _audit_refusal(
        scope["state"],
        scope["headers"],
        error,
        request_id=request_id,
        method=scope["method"],
        path=scope["raw_path"].decode("latin-1"),
        peer=client[0] if client else None,
    )
    await error_reply(error, request_id).send(send)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a header deadline, a header size limit and a connection cap."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = server_settings(self.app_state)
        self._deadline: asyncio.TimerHandle | None = None
        self._request_active = False
        self._partial = False
        self._head_bytes = 0
        self._header_bytes = 0
        self._refusal: ProxyError | None = None

    # -- the header deadline
    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._limits.header_timeout_seconds, self._deadline_passed)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self._request_active:
            return
        if not self._partial:
            self.transport.close()
            return
        seconds = f"{self._limits.header_timeout_seconds:g}"
        self._refuse(
            RequestTimeoutError(f"the request headers did not arrive within {seconds} s", reason="header_timeout")
        )

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._request_active:
            cycle = self.cycle
            if cycle is None or not cycle.more_body:
                self._partial = True  # a new request; otherwise the rest of an answered request's body
            if self._deadline is None:
                self._arm()
        super().data_received(data)
        if self._partial and not self._request_active and not self.transport.is_closing():
            # Still in a request's line and headers. httptools buffers an unfinished header without
            # limit, so count the bytes as they arrive: at most one read beyond the limit is held.
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_header_bytes:
                self._refuse(self._too_large())

    def _too_large(self) -> HeadersTooLargeError:
        return HeadersTooLargeError(
            f"the request line and headers are larger than {self._limits.max_header_bytes} bytes"
        )

    # Complete headers are counted too: one read may hold a whole oversized request head.
    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self._limits.max_header_bytes:
            self._refusal = self._too_large()
            raise _Refused

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    # -- requests
    def on_headers_complete(self) -> None:
        self._disarm()
        if self.parser.get_http_version() not in ("1.0", "1.1"):
            # llhttp reads "GET /x?a=<CR><LF>Name: v" as HTTP/0.9 followed by headers: never valid.
            self._refusal = BadRequestError("the request line has no HTTP/1.x version", reason="bad_http")
            raise _Refused
        self._request_active = True
        limit = self._limits.max_connections
        if len(self.connections) > limit or len(self.tasks) >= limit:
            app, self.app = self.app, _overloaded
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        next_request = bool(self.pipeline)
        super().on_response_complete()
        self._request_active = next_request
        self._partial = False
        self._head_bytes = 0

    def send_400_response(self, msg: str) -> None:
        error = self._refusal or BadRequestError(
            "the request is not valid HTTP/1.1 (a malformed request line or header, a bare CR or LF, "
            "or conflicting message framing)",
            reason="bad_http",
        )
        self._refusal = None
        cycle = self.cycle
        if self._request_active and cycle is not None and not cycle.response_complete:
            # The proxy is already handling this request (and writes its record); just end it. With
            # pipelined requests queued, an answer written now could interleave with another one.
            if not cycle.response_started and not self.pipeline:
                self._write_error(error, self._request_id())
            self.transport.close()
            return
        self._refuse(error)

    # -- answering without the app
    def _request_id(self) -> str:
        return request_id_of(getattr(self, "headers", None) or [], self._limits)

    def _refuse(self, error: ProxyError) -> None:
        self._disarm()
        headers = getattr(self, "headers", None) or []
        request_id = self._request_id()
        url: bytes = getattr(self, "url", b"") or b""
        method = "-"
        if url:
            try:
                method = self.parser.get_method().decode("ascii", "replace")
            except Exception:  # the parser may not know it yet
                method = "-"
        _audit_refusal(
            self.app_state,
            headers,
            error,
            request_id=request_id,
            method=method,
            path=url.split(b"?", 1)[0][:512].decode("latin-1"),
            peer=self.client[0] if self.client else None,
        )
        self._write_error(error, request_id)
        self.transport.close()

    def _write_error(self, error: ProxyError, request_id: str) -> None:
        self.transport.write(error_reply(error, request_id).http1(self.server_state.default_headers))


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn options for the defences above (see ``slurmproxy.commands.serve.uvicorn_options``)."""
    return {
        "http": PROTOCOL,
        "ws": "none",
        "timeout_keep_alive": settings.server.keep_alive_seconds,
        "limit_concurrency": None,  # the protocol's connection cap answers in JSON and audits
        "backlog": 2048,
    }
