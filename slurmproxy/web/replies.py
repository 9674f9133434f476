"""What the proxy sends back, written straight as ASGI messages, and the one renderer of error bodies.

Error bodies are in slurmrestd's ``errors`` shape, so its clients parse them, plus a ``slurmproxy``
object with the status, the reason, the request id and the error's public ``fields``:
:func:`error_body` builds every one of them, whether it goes out through ASGI (:func:`error_reply`)
or straight onto a connection the server refuses (:meth:`Reply.http1`).

The forwarding path does not use Starlette's response classes: StreamingResponse runs a task group
per response to watch for disconnects, which cost more CPU than everything else the proxy did for a
small answer. A reply here is one ``http.response.start`` and either one body message or the
upstream's chunks, the last one marked as the end.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from slurmproxy import __version__
from slurmproxy.errors import ProxyError
from slurmproxy.upstream.exchange import UpstreamResponse
from slurmproxy.upstream.headers import normalized
from slurmproxy.upstream.shield import ShieldResult

logger = logging.getLogger("slurmproxy.proxy")
JSON = "application/json"
_JSON = (b"content-type", JSON.encode())


def error_body(error: ProxyError, request_id: str) -> dict[str, Any]:
    status, reason, detail = error.status_code, error.reason, error.detail
    return {
        "errors": [
            {"error": detail, "error_number": status, "description": f"slurmproxy: {reason}", "source": "slurmproxy"}
        ],
        "warnings": [],
        "meta": {"plugin": {"type": "slurmproxy", "name": "slurmproxy", "version": __version__}},
        "slurmproxy": {"status": status, "reason": reason, "request_id": request_id, **error.fields},
    }


def encode(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(slots=True)
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    stream: UpstreamResponse | None = field(default=None)
    keep: object = None  # kept alive until sent: the shield counts a shared body's bytes until its last holder goes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.send(send)

    async def send(self, send: Send) -> None:
        if self.stream is None:
            await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
            await send({"type": "http.response.body", "body": self.body})
            return
        upstream = self.stream
        try:
            await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
            previous: bytes | None = None
            async for chunk in upstream.chunks():
                if previous is not None:
                    await send({"type": "http.response.body", "body": previous, "more_body": True})
                previous = chunk
            await send({"type": "http.response.body", "body": previous or b""})
        except ProxyError as exc:
            # Headers are out: all that is left is to end the connection, which the server does.
            logger.warning("slurmrestd's answer broke off after it started (%s)", exc.reason)
        finally:
            await upstream.aclose()

    async def discard(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()

    def http1(self, default_headers: list[tuple[bytes, bytes]]) -> bytes:
        """The reply as HTTP/1.1 bytes, for a connection the server answers and closes by itself."""
        lines = [f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}".encode()]
        lines += [name + b": " + value for name, value in default_headers]
        lines += [name + b": " + value for name, value in self.headers if name != b"connection"]
        lines.append(b"connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


def error_reply(error: ProxyError, request_id: str) -> Reply:
    payload = encode(error_body(error, request_id))
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    headers += [_JSON, (b"content-length", str(len(payload)).encode()), (b"x-request-id", request_id.encode())]
    return Reply(error.status_code, headers, payload)


def json_reply(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    payload = encode(body)
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return Reply(status, [_JSON, (b"content-length", str(len(payload)).encode()), *extra], payload)


def json_response(body: Any, status: int = 200) -> Response:
    """For the proxy's own Starlette endpoints (liveness, readiness)."""
    return Response(encode(body), status_code=status, media_type=JSON)


def reply_from(result: ShieldResult, request_id: str) -> Reply:
    """slurmrestd's answer (its own, shared with identical requests, or cached) with this request's id."""
    source = result.shared if result.shared is not None else result.stream
    assert source is not None
    headers = [(k, v) for k, v in source.headers if normalized(k) != b"x-request-id"]
    headers.append((b"x-request-id", request_id.encode()))
    if result.source == "cache":
        headers.append((b"age", str(int(result.age)).encode()))
    if result.shared is not None:
        return Reply(result.shared.status_code, headers, result.shared.body, keep=result.shared)
    assert result.stream is not None
    return Reply(result.stream.status_code, headers, stream=result.stream)
