"""Forwarding to slurmrestd: header policy, one pooled async client, streaming both ways.

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

import httpx

from slurmproxy.errors import UpstreamError, UpstreamTimeoutError
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
# Never forwarded from the client: set by httpx for the upstream, or a credential.
_CLIENT_DROP = HOP_BY_HOP | {b"host", b"authorization", b"content-length", b"expect"}
_RESPONSE_DROP = HOP_BY_HOP
UNIX_BASE_URL = "http://slurmrestd"


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


def create_client(settings: UpstreamSettings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(settings.timeout_seconds, connect=settings.connect_timeout_seconds)
    limits = httpx.Limits(max_connections=settings.max_connections, max_keepalive_connections=settings.max_connections)
    if settings.url.startswith("unix:"):
        transport = httpx.AsyncHTTPTransport(uds=settings.url[len("unix:") :], limits=limits, retries=1)
        base_url = UNIX_BASE_URL
    else:
        transport = httpx.AsyncHTTPTransport(limits=limits, retries=1)
        base_url = settings.url.rstrip("/")
    return httpx.AsyncClient(
        base_url=base_url, transport=transport, timeout=timeout, follow_redirects=False, trust_env=False
    )


@dataclass
class UpstreamResponse:
    status_code: int
    headers: list[tuple[bytes, bytes]]
    response: httpx.Response
    _peeked: list[bytes] = field(default_factory=list)  # chunks read by peek(), replayed by body() and stream()
    _raw: AsyncIterator[bytes] | None = None

    def _upstream_chunks(self) -> AsyncIterator[bytes]:
        if self._raw is None:
            self._raw = self.response.aiter_raw()
        return self._raw

    async def _chunks(self) -> AsyncIterator[bytes]:
        while self._peeked:
            yield self._peeked.pop(0)
        async for chunk in self._upstream_chunks():
            yield chunk

    async def peek(self, limit: int) -> bytes | None:
        """The whole body if it has at most ``limit`` bytes, else None; either way still sent on by body()/stream()."""
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
        async for chunk in self._chunks():
            size += len(chunk)
            if size > limit:
                raise UpstreamError("slurmrestd's answer is too large to inspect", reason="upstream_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def stream(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._chunks():
                yield chunk
        finally:
            await self.response.aclose()

    async def aclose(self) -> None:
        await self.response.aclose()


async def send(
    client: httpx.AsyncClient,
    *,
    method: str,
    path: str,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    content: bytes | AsyncIterator[bytes] | None,
) -> UpstreamResponse:
    url = path + ("?" + query.decode("ascii") if query else "")
    request = client.build_request(method, url, headers=headers, content=content)
    try:
        response = await client.send(request, stream=True)
    except httpx.ConnectTimeout as exc:
        raise UpstreamError("slurmrestd did not accept the connection in time", reason="upstream_unreachable") from exc
    except httpx.TimeoutException as exc:
        raise UpstreamTimeoutError("slurmrestd did not answer in time", reason="upstream_timeout") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError(
            "slurmrestd is unreachable or closed the connection", reason="upstream_unreachable"
        ) from exc
    return UpstreamResponse(response.status_code, response_headers(response.headers.raw), response)
