"""A lean HTTP/1.1 client for the one upstream the proxy forwards to (slurmrestd).

Why not httpx here: on the forwarding path httpx and httpcore cost about 400 µs of CPU per request
(request/response models, URL handling, anyio streams, h11 in pure Python), more than everything
else the proxy does. This client speaks HTTP/1.1 over asyncio protocols with llhttp (httptools,
the parser uvicorn uses) and keeps a bounded pool of keep-alive connections: about 20 µs per
request. httpx stays for everything else (identity providers, ALISE).

Errors are the proxy's own (:mod:`slurmproxy.errors`): ``UpstreamConnectError`` (502, with
``UpstreamClosed`` when slurmrestd closed the connection or did not speak HTTP/1.1),
``UpstreamReadTimeout`` and ``UpstreamBusy`` (504).

Scope, deliberately small: one origin (TCP, TLS or a unix socket); requests with a body given as
bytes or as an async iterator with a known length; responses streamed with flow control; every
wait bounded by a timeout; a connection is reused only after a complete response that allows it,
and dropped after ``idle_seconds`` unused. A request that fails on a reused connection before any
response byte arrived is retried once on a new connection when its method is idempotent.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

from slurmproxy.errors import (
    ConcurrencyLimitedError,
    UpstreamBusy,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamReadTimeout,
    UpstreamTimeoutError,
)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "PUT"})
_HIGH_WATER = 1024 * 1024  # buffered response bytes before reading from the socket pauses
_MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int
    uds: str | None
    host_header: bytes

    @classmethod
    def parse(cls, url: str) -> Origin:
        if url.startswith("unix:"):
            return cls("http", "localhost", 0, url[len("unix:") :], b"localhost")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("the URL must not contain a user name or password")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, None, parts.netloc.encode("ascii"))


class _Connection(asyncio.Protocol):
    """One connection: the socket, the response parser, and the body buffer of the current response."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._loop = loop
        self.read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle = False  # pooled, between requests: any byte arriving now is not ours to read
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self.head_request = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._error: UpstreamError | UpstreamTimeoutError | None = None
        self._paused = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reset()

    def _reset(self) -> None:
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.keep_alive = False
        self.complete = False
        self.received_any = False
        self._header_bytes = 0
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if self.idle:
            self._fail(UpstreamClosed("the upstream sent data between requests"))
            return
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(UpstreamClosed("the upstream's answer is not valid HTTP/1.1"))
            return
        if self._buffered > _HIGH_WATER and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and exc is None and not self._delimited():
            self.complete = True  # a body delimited by the end of the connection (RFC 9112 §6.3)
        if not self.complete:
            self._fail(UpstreamClosed("the upstream closed the connection"))
        self._can_write.set()
        self._wake()

    def _delimited(self) -> bool:
        return any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.headers)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer to one request (or bytes after the answer's end): never read as part of
            # this answer, and never left for the next request on this connection.
            raise httptools.HttpParserError("data after the end of the answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > _MAX_HEADER_BYTES:
            raise httptools.HttpParserError("response headers too large")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        self.headers_done = True
        if self.head_request:
            # A HEAD answer has no body whatever its Content-Length says; the parser cannot be told,
            # so the answer ends here and the connection is not reused.
            self.complete = True
            self.head_request = False
            self._error = UpstreamClosed("not reusable after HEAD")

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True

    # waiting, with one reusable timer per wait
    def _fail(self, error: UpstreamError | UpstreamTimeoutError) -> None:
        if self._error is None:
            self._error = error
        if self.transport is not None:
            self.transport.close()
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _on_timeout(self) -> None:
        self._fail(UpstreamReadTimeout())

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self._loop.create_future()
        self._timer = self._loop.call_later(self.read_timeout, self._on_timeout)
        try:
            await self._waiter
        finally:
            self._timer.cancel()
            self._waiter = None
        if self._error is not None and not self._chunks and not self.complete:
            raise self._error

    async def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise self._error or UpstreamClosed("the upstream closed the connection")
        self.transport.write(data)
        if not self._can_write.is_set():
            await self._can_write.wait()

    async def response_head(self) -> None:
        while not self.headers_done:
            await self._wait()

    async def next_chunk(self) -> bytes | None:
        while not self._chunks:
            if self.complete:
                return None
            await self._wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < _HIGH_WATER // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self._error is None

    def recycle(self, now: float) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._reset()
        self.idle = True
        self.idle_since = now

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """A response whose body is read as it arrives. Read it to the end, or ``aclose()`` it."""

    def __init__(self, pool: ConnectionPool, conn: _Connection) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        assert conn.status is not None
        self.status_code: int = conn.status
        self.headers: list[tuple[bytes, bytes]] = conn.headers

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        try:
            while True:
                chunk = await conn.next_chunk()
                if chunk is None:
                    break
                yield chunk
        except BaseException:
            self._release(reuse=False)
            raise
        self._release(reuse=True)

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        self._release(reuse=False)

    def _release(self, *, reuse: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn, reuse=reuse and conn.reusable())


class ConnectionPool:
    def __init__(
        self,
        url: str,
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        idle_seconds: float,
        max_per_owner: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.origin = Origin.parse(url)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle_seconds = idle_seconds
        self._ssl = ssl_context if self.origin.scheme == "https" else None
        if self.origin.scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        self._clock = clock
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._active: set[_Connection] = set()
        self._taken = 0  # slots held: from acquiring one to releasing its response
        # Per owner (an identity): requests from their start to their response's release.
        self._max_per_owner = max_per_owner
        self._held: dict[str, int] = {}
        self._owner_of: dict[_Connection, str] = {}

    @property
    def connections_in_use(self) -> int:
        """Connections taken by requests in progress (sending, waiting for, or reading an answer)."""
        return self._taken

    def _hold(self, owner: str | None) -> None:
        if owner is None or self._max_per_owner is None:
            return
        held = self._held.get(owner, 0)
        if held >= self._max_per_owner:
            raise ConcurrencyLimitedError(self._max_per_owner)
        self._held[owner] = held + 1

    def _unhold(self, owner: str | None) -> None:
        if owner is None or owner not in self._held:
            return
        self._held[owner] -= 1
        if self._held[owner] <= 0:
            del self._held[owner]

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(loop, self._read_timeout)
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self.origin.uds is not None:
                    await loop.create_unix_connection(lambda: conn, self.origin.uds)
                else:
                    server_hostname = self.origin.host if self._ssl is not None else None
                    await loop.create_connection(
                        lambda: conn, self.origin.host, self.origin.port, ssl=self._ssl, server_hostname=server_hostname
                    )
        except TimeoutError as exc:
            raise UpstreamConnectError(
                "connect timed out", detail="slurmrestd did not accept the connection in time"
            ) from exc
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect ({exc.strerror or type(exc).__name__})") from exc
        return conn

    def _take_idle(self) -> _Connection | None:
        now = self._clock()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self._idle_seconds:
                return conn
            conn.close()
        return None

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] | None = None,
        *,
        timeout: float | None = None,
        owner: str | None = None,
    ) -> Response:
        """Send a request; return once the response's status and headers have arrived.

        ``timeout`` replaces the pool's read timeout for this request. An ``owner`` already holding
        ``max_per_owner`` requests (waiting for a connection included) gets ConcurrencyLimitedError
        at once; the request counts against its owner until its response is released.
        """
        head = _request_head(method, target, self.origin.host_header, headers, body)
        self._hold(owner)
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._slots.acquire()
        except TimeoutError as exc:
            self._unhold(owner)
            raise UpstreamBusy() from exc
        except BaseException:
            self._unhold(owner)
            raise
        self._taken += 1
        conn: _Connection | None = None
        try:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._open()
            conn.read_timeout = timeout or self._read_timeout
            try:
                await self._exchange(conn, method, head, body)
            except UpstreamClosed:
                # A kept-alive connection the upstream closed meanwhile: once more on a fresh one.
                retry = reused and not conn.received_any and method in IDEMPOTENT and not _streamed(body)
                if not retry:
                    raise
                conn.close()
                conn = await self._open()
                conn.read_timeout = timeout or self._read_timeout
                await self._exchange(conn, method, head, body)
            self._active.add(conn)
            if owner is not None:
                self._owner_of[conn] = owner
            return Response(self, conn)
        except BaseException:
            if conn is not None:
                conn.close()
            self._taken -= 1
            self._slots.release()
            self._unhold(owner)
            raise

    async def _exchange(
        self, conn: _Connection, method: str, head: bytes, body: bytes | AsyncIterator[bytes] | None
    ) -> None:
        conn.idle = False
        conn.head_request = method == "HEAD"
        if body is None or isinstance(body, bytes):
            await conn.write(head + (body or b""))
        else:
            await conn.write(head)
            async for chunk in body:
                await conn.write(chunk)
        await conn.response_head()

    def release(self, conn: _Connection, *, reuse: bool) -> None:
        if conn not in self._active:
            return
        self._active.discard(conn)
        self._taken -= 1
        self._slots.release()
        self._unhold(self._owner_of.pop(conn, None))
        if reuse:
            conn.recycle(self._clock())
            self._idle.append(conn)
        else:
            conn.close()

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for conn in self._idle + list(self._active):
            conn.close()
        self._idle.clear()
        self._active.clear()
        self._owner_of.clear()
        self._held.clear()


def _streamed(body: bytes | AsyncIterator[bytes] | None) -> bool:
    return body is not None and not isinstance(body, bytes)


def _request_head(
    method: str, target: str, host: bytes, headers: list[tuple[bytes, bytes]], body: bytes | AsyncIterator[bytes] | None
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode("ascii"), b"Host: " + host]
    has_length = False
    for name, value in headers:
        if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name or b":" in name:
            raise ValueError("header names and values must not contain CR, LF or ':' in names")
        if name.lower() == b"content-length":
            has_length = True
        lines.append(name + b": " + value)
    if isinstance(body, bytes) and not has_length:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    elif body is not None and not isinstance(body, bytes) and not has_length:
        raise ValueError("a streamed request body needs a Content-Length header")
    return b"\r\n".join(lines) + b"\r\n\r\n"
