"""What the HTTP edge reads from a request: headers, the request id, the client's address, the body.

:func:`record_for` starts the audit record of every request the proxy answers (the proxy's own
endpoints and connections the server refuses included), so that each names its client the same way
(``server.trusted_proxies``) and carries the same request id as the response.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.types import Receive, Scope

from slurmproxy.audit.log import AuditTrail
from slurmproxy.audit.record import AuditRecord
from slurmproxy.config.settings import ServerSettings, Settings
from slurmproxy.core.slurmrest import takes_body
from slurmproxy.errors import BadRequestError, PayloadTooLargeError
from slurmproxy.web.forwarded import client_address

Headers = Sequence[tuple[bytes, bytes]]
_REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,128}")
_DEFAULTS = ServerSettings()


class EdgeRuntime(Protocol):
    """What the HTTP edge needs of the running proxy (the lifespan puts it in the app state)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def trail(self) -> AuditTrail: ...


def runtime_of(state: Mapping[str, Any]) -> EdgeRuntime | None:
    runtime: EdgeRuntime | None = state.get("runtime")
    return runtime


def server_settings(state: Mapping[str, Any]) -> ServerSettings:
    """The running proxy's server settings (the defaults before the lifespan has built the runtime)."""
    runtime = runtime_of(state)
    return runtime.settings.server if runtime is not None else _DEFAULTS


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of a header (names as ASGI gives them: lower case)."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def headers_named(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in headers if key == name]


def single_content_type(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The request's one Content-Type (None without one); 400 for two, also spelled ``content_type``:
    the proxy would check one and slurmrestd might read the other."""
    found = [value for key, value in headers if key.replace(b"_", b"-") == b"content-type"]
    if len(found) > 1:
        raise BadRequestError("the request has more than one Content-Type header", reason="duplicate_content_type")
    return found[0].decode("latin-1") if found else None


def request_id_of(headers: Iterable[tuple[bytes, bytes]], settings: ServerSettings) -> str:
    """The client's request id if it is well-formed, else a new one."""
    supplied = header(headers, settings.request_id_header.lower().encode())
    if supplied is not None and _REQUEST_ID.fullmatch(supplied):
        return supplied
    return uuid.uuid4().hex


def record_for(
    headers: Headers,
    settings: ServerSettings,
    *,
    request_id: str,
    method: str,
    path: str,
    peer: str | None,
    operation: str | None = None,
) -> AuditRecord:
    """The audit record of a request as it arrives."""
    return AuditRecord.begin(
        request_id,
        method,
        path,
        client=client_address(peer, headers_named(headers, b"x-forwarded-for"), settings.trusted_proxies),
        peer=peer,
        user_agent=header(headers, b"user-agent"),
        operation=operation,
    )


@dataclass(frozen=True, slots=True)
class Incoming:
    """An ASGI HTTP request as the pipeline uses it."""

    request_id: str
    method: str
    raw_path: bytes
    query: bytes
    headers: Headers
    peer: str | None

    @classmethod
    def of(cls, scope: Scope, settings: ServerSettings) -> Incoming:
        headers: Headers = scope["headers"]
        client = scope.get("client")
        return cls(
            request_id=request_id_of(headers, settings),
            method=scope["method"],
            raw_path=scope.get("raw_path") or scope["path"].encode(),
            query=scope.get("query_string", b""),
            headers=headers,
            peer=client[0] if client else None,
        )

    def header(self, name: bytes) -> str | None:
        return header(self.headers, name)

    def record(self, settings: ServerSettings, *, operation: str | None = None) -> AuditRecord:
        path = self.raw_path.decode("latin-1")
        return record_for(
            self.headers,
            settings,
            request_id=self.request_id,
            method=self.method,
            path=path,
            peer=self.peer,
            operation=operation,
        )


async def stream_body(receive: Receive, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives; 413 once it passes ``limit``, 400 if the client goes away."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequestError("the client went away while sending the body", reason="client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the request body is larger than {limit} bytes")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def read_body(receive: Receive, limit: int) -> bytes:
    return b"".join([chunk async for chunk in stream_body(receive, limit)])


def check_body_allowed(request: Incoming, path: str) -> None:
    """400 ``body_not_allowed`` for a body (a Content-Length above 0, or chunked) where slurmrestd reads
    none: before anything else, so that such a request never waits on a token check, let alone holds a
    connection to slurmrestd while its body trickles in."""
    length = request.header(b"content-length")
    has_body = request.header(b"transfer-encoding") is not None or (length is not None and length.strip() != "0")
    if has_body and not takes_body(request.method, path):
        raise BadRequestError(
            f"slurmrestd takes no request body for {request.method} {path}; send none", reason="body_not_allowed"
        )


async def forwarded_body(request: Incoming, receive: Receive, limit: int, path: str) -> tuple[bytes | None, str | None]:
    """The body to forward, read whole before anything is forwarded (at most ``limit`` bytes, else 413,
    within the body deadline), so a slow client never holds one of slurmrestd's connections; sent with
    the Content-Length of what was read. None where slurmrestd takes no body (:func:`check_body_allowed`
    refused any but an empty one)."""
    if not takes_body(request.method, path):
        return None, None
    length = request.header(b"content-length")
    if length is None and request.header(b"transfer-encoding") is None:
        return b"", None
    if length is not None:
        if not length.isdigit():
            raise BadRequestError("Content-Length is not a number", reason="bad_content_length")
        if int(length) > limit:
            raise PayloadTooLargeError(f"the request body is larger than {limit} bytes")
    body = await read_body(receive, limit)
    return body, str(len(body))
