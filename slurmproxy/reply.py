"""What the proxy sends back, written straight as ASGI messages.

The forwarding path does not use Starlette's response classes: StreamingResponse runs a task group
per response to watch for disconnects, which cost more CPU than everything else the proxy did for a
small answer. A reply here is one ``http.response.start`` and either one body message or the
upstream's chunks, the last one marked as the end.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from starlette.types import Send

from slurmproxy.errors import ProxyError
from slurmproxy.responses import error_body
from slurmproxy.upstream import UpstreamResponse

logger = logging.getLogger("slurmproxy.proxy")
_JSON = (b"content-type", b"application/json")


@dataclass(slots=True)
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    stream: UpstreamResponse | None = field(default=None)
    keep: object = None  # kept alive until sent: the shield counts a shared body's bytes until its last holder goes

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


def error_reply(error: ProxyError, request_id: str) -> Reply:
    body = error_body(error.status_code, error.reason, error.detail, request_id)
    body["slurmproxy"].update(error.fields)
    payload = json.dumps(body, separators=(",", ":")).encode()
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    headers += [_JSON, (b"content-length", str(len(payload)).encode()), (b"x-request-id", request_id.encode())]
    return Reply(error.status_code, headers, payload)
