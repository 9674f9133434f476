"""One exchange with slurmrestd through the pooled client (:mod:`slurmproxy.upstream.client`): the
request sent with the proxy's headers, the answer streamed back (or peeked at, or read whole)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from slurmproxy.config.settings import UpstreamSettings
from slurmproxy.errors import UpstreamError
from slurmproxy.upstream.client import ConnectionPool
from slurmproxy.upstream.headers import response_headers


def create_client(settings: UpstreamSettings) -> ConnectionPool:
    return ConnectionPool(
        settings.url,
        max_connections=settings.max_connections,
        max_per_owner=settings.max_connections_per_identity,
        connect_timeout=settings.connect_timeout_seconds,
        read_timeout=settings.timeout_seconds,
        idle_seconds=settings.keepalive_seconds,
    )


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
        async for chunk in self._upstream_chunks():
            yield chunk

    async def peek(self, limit: int) -> bytes | None:
        """The whole body if it has at most ``limit`` bytes, else None; either way still sent on by body()/chunks()."""
        size = sum(len(chunk) for chunk in self._peeked)
        async for chunk in self._upstream_chunks():
            self._peeked.append(chunk)
            size += len(chunk)
            if size > limit:
                return None
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
    owner: str | None = None,
) -> UpstreamResponse:
    target = path + ("?" + query.decode("ascii") if query else "")
    response = await client.request(method, target, headers, content, timeout=timeout, owner=owner)
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
