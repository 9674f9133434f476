"""Forwarding to slurmrestd: header policy, one pooled connection pool (httpclient.py), streaming both ways.

Header policy, applied to every request before anything is added:

* hop-by-hop headers (RFC 9110 §7.6.1) and those named in ``Connection`` are dropped;
* ``Authorization`` is always dropped: since Slurm 23.02, slurmrestd would read it as a Slurm token;
* every header whose name, lower-cased with ``_`` read as ``-``, starts with ``x-slurm-`` is
  dropped: slurmrestd trusts ``X-SLURM-USER-NAME``/``X-SLURM-USER-TOKEN`` as given;
* then the proxy's own credential headers for the mapped user are added.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from slurmproxy.errors import ProxyError, UpstreamError, UpstreamTimeoutError
from slurmproxy.httpclient import (
    ConnectionPool,
    ConnectTimeout,
    HTTPClientError,
    PoolTimeout,
    ReadTimeout,
)
from slurmproxy.settings import UpstreamSettings

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Never forwarded from the client: set by the proxy for the upstream, or a credential.
_CLIENT_DROP = HOP_BY_HOP | {b"host", b"authorization", b"content-length", b"expect"}
_RESPONSE_DROP = HOP_BY_HOP


def normalized(name: bytes) -> bytes:
    return name.lower().replace(b"_", b"-")


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if normalized(name) == b"connection":
            tokens.update(normalized(t.strip()) for t in value.split(b","))
    return tokens


def client_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The client's headers that may reach slurmrestd (before the proxy adds its own)."""
    headers = list(headers)
    named = _connection_tokens(headers)
    kept: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        norm = normalized(name)
        if norm in _CLIENT_DROP or norm in named or norm.startswith(b"x-slurm-"):
            continue
        kept.append((name, value))
    return kept


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    headers = list(headers)
    named = _connection_tokens(headers)
    return [(n, v) for n, v in headers if normalized(n) not in _RESPONSE_DROP and normalized(n) not in named]


def create_client(settings: UpstreamSettings) -> ConnectionPool:
    return ConnectionPool(
        settings.url,
        max_connections=settings.max_connections,
        connect_timeout=settings.connect_timeout_seconds,
        read_timeout=settings.timeout_seconds,
        idle_seconds=settings.keepalive_seconds,
    )


def _mapped(exc: HTTPClientError) -> ProxyError:
    if isinstance(exc, ConnectTimeout):
        return UpstreamError("slurmrestd did not accept the connection in time", reason="upstream_unreachable")
    if isinstance(exc, ReadTimeout):
        return UpstreamTimeoutError("slurmrestd did not answer in time", reason="upstream_timeout")
    if isinstance(exc, PoolTimeout):
        return UpstreamTimeoutError("every connection to slurmrestd is busy", reason="upstream_busy")
    return UpstreamError("slurmrestd is unreachable or closed the connection", reason="upstream_unreachable")


class RawBody(Protocol):
    """What UpstreamResponse needs from the client's response (httpclient.Response)."""

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@dataclass
class UpstreamResponse:
    status_code: int
    headers: list[tuple[bytes, bytes]]
    response: RawBody
    _peeked: list[bytes] = field(default_factory=list)  # chunks read by peek(), replayed by body() and chunks()
    _raw: AsyncIterator[bytes] | None = None

    def _upstream_chunks(self) -> AsyncIterator[bytes]:
        if self._raw is None:
            self._raw = self.response.aiter_raw()
        return self._raw

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (after what peek() read); the caller closes the response."""
        while self._peeked:
            yield self._peeked.pop(0)
        try:
            async for chunk in self._upstream_chunks():
                yield chunk
        except HTTPClientError as exc:
            raise _mapped(exc) from exc

    async def peek(self, limit: int) -> bytes | None:
        """The whole body if it has at most ``limit`` bytes, else None; either way still sent on by body()/chunks()."""
        size = sum(len(chunk) for chunk in self._peeked)
        try:
            async for chunk in self._upstream_chunks():
                self._peeked.append(chunk)
                size += len(chunk)
                if size > limit:
                    return None
        except HTTPClientError as exc:
            raise _mapped(exc) from exc
        return None if size > limit else b"".join(self._peeked)

    async def body(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                await self.aclose()
                raise UpstreamError("slurmrestd's answer is too large to inspect", reason="upstream_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        await self.response.aclose()


async def send(
    client: ConnectionPool,
    *,
    method: str,
    path: str,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    content: bytes | AsyncIterator[bytes] | None,
    timeout: float | None = None,
) -> UpstreamResponse:
    target = path + ("?" + query.decode("ascii") if query else "")
    try:
        response = await client.request(method, target, headers, content, timeout=timeout)
    except HTTPClientError as exc:
        raise _mapped(exc) from exc
    return UpstreamResponse(response.status_code, response_headers(response.headers), response)


async def fetch(
    client: ConnectionPool,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    *,
    limit: int,
    timeout: float | None = None,
) -> tuple[int, bytes]:
    """A whole small answer (status, body) from slurmrestd, for the proxy's own calls; ProxyError on failure."""
    response = await send(client, method=method, path=path, query=b"", headers=headers, content=None, timeout=timeout)
    return response.status_code, await response.body(limit)
