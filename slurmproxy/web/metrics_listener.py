"""The metrics on a listener of their own (``metrics.port``): Prometheus scrapes it, the public port
never shows them.

Deliberately small: ``GET`` (or ``HEAD``) of ``metrics.path`` answers the metrics, anything else 404;
one request per connection (``Connection: close``). The main port's defences apply: the request must
arrive within ``server.header_timeout_seconds`` and fit in 16 KiB, and at most 64 connections are
open at once (more are closed at once). The metrics are rendered in a thread (in multiprocess mode
that reads every worker's files). With several workers each binds the port with ``SO_REUSEPORT``,
and any of them answers for all (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import httptools

logger = logging.getLogger("slurmproxy.httpserver")
MAX_REQUEST_BYTES = 16 * 1024
MAX_CONNECTIONS = 64
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def _response(
    status: bytes, body: bytes, content_type: bytes = b"text/plain; charset=utf-8", *, head: bool = False
) -> bytes:
    lines = [
        b"HTTP/1.1 " + status,
        b"Content-Type: " + content_type,
        b"Content-Length: " + str(len(body)).encode(),
        b"Cache-Control: no-store",
        b"Connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body)


class _Scrape(asyncio.Protocol):
    def __init__(self, listener: MetricsListener) -> None:
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._counted = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if self._listener.open >= MAX_CONNECTIONS:
            transport.close()
            return
        self._listener.open += 1
        self._counted = True
        self._timer = self._loop.call_later(self._listener.header_timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self._task is not None:
            return  # one request per connection: whatever follows it is ignored
        self._size += len(data)
        if self._size > MAX_REQUEST_BYTES:
            self._answer(_response(b"431 Request Header Fields Too Large", b"request too large\n"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._answer(_response(b"400 Bad Request", b"malformed request\n"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._listener.open -= 1
            self._counted = False
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_message_complete(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        method = self._parser.get_method()
        path = httptools.parse_url(self._url).path or b""
        if method in (b"GET", b"HEAD") and path.decode("latin-1") == self._listener.path:
            self._task = self._loop.create_task(self._serve(head=method == b"HEAD"))
        else:
            self._answer(_response(b"404 Not Found", b"not found: only the metrics are served here\n"))

    async def _serve(self, *, head: bool) -> None:
        try:
            body = await asyncio.to_thread(self._listener.render)
        except Exception:
            logger.exception("cannot render the metrics")
            self._answer(_response(b"500 Internal Server Error", b"cannot render the metrics\n"))
            return
        self._answer(_response(b"200 OK", body, CONTENT_TYPE, head=head))

    def _too_slow(self) -> None:
        self._timer = None
        self._answer(_response(b"408 Request Timeout", b"the request did not arrive in time\n"))

    def _answer(self, response: bytes) -> None:
        transport, self._transport = self._transport, None
        if transport is not None and not transport.is_closing():
            transport.write(response)
            transport.close()


class MetricsListener:
    """Serves ``render()`` at ``path`` on its own socket, for as long as it is started."""

    def __init__(self, render: Callable[[], bytes], path: str, *, header_timeout: float) -> None:
        self.render = render
        self.path = path
        self.header_timeout = header_timeout
        self.open = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # every worker binds it
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Scrape(self), sock=sock)
        logger.info("serving metrics on %s port %d (path %s)", host, port, self.path)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
