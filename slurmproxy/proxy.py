"""The request pipeline, readable top to bottom:

canonical path → authenticate → authorize (policy) → map identity → forward → audit → respond.

The audit record is written before the response starts, so a request the proxy answered always
has its record; the client's credentials never reach slurmrestd.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import AsyncIterator

from starlette.types import Receive, Scope, Send

from slurmproxy.audit import AuditRecord, AuditWriteError
from slurmproxy.authorize import authorize
from slurmproxy.errors import (
    BadRequestError,
    DependencyError,
    PayloadTooLargeError,
    ProxyError,
)
from slurmproxy.forwarded import client_address
from slurmproxy.logs import request_id_var
from slurmproxy.paths import canonical_path, check_query
from slurmproxy.reply import Reply, error_reply
from slurmproxy.runtime import Runtime
from slurmproxy.shield import ShieldResult, variant
from slurmproxy.upstream import UpstreamResponse, client_headers, normalized, send

logger = logging.getLogger("slurmproxy.proxy")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,128}")
_BODYLESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
MAX_INSPECTED_RESPONSE = 1024 * 1024


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _headers(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope["headers"] if key == name]


def request_id_of(scope: Scope, header: bytes) -> str:
    supplied = _header(scope, header)
    if supplied is not None and _REQUEST_ID.fullmatch(supplied):
        return supplied
    return uuid.uuid4().hex


async def _stream_body(receive: Receive, limit: int) -> AsyncIterator[bytes]:
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
    return b"".join([chunk async for chunk in _stream_body(receive, limit)])


async def _request_content(scope: Scope, receive: Receive, limit: int) -> bytes | AsyncIterator[bytes] | None:
    """The body to forward: streamed when the client sent Content-Length, else read whole (bounded)."""
    method = scope["method"]
    length = _header(scope, b"content-length")
    chunked = _header(scope, b"transfer-encoding") is not None
    if length is None and not chunked:
        return None if method in _BODYLESS else b""
    if length is not None:
        if not length.isdigit():
            raise BadRequestError("Content-Length is not a number", reason="bad_content_length")
        if int(length) > limit:
            raise PayloadTooLargeError(f"the request body is larger than {limit} bytes")
        return _stream_body(receive, limit)
    return await read_body(receive, limit)


def job_id_from(body: bytes) -> int | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    job_id = data.get("job_id")
    if job_id is None and isinstance(data.get("result"), dict):
        job_id = data["result"].get("job_id")
    return job_id if isinstance(job_id, int) and not isinstance(job_id, bool) else None


class ProxyEndpoint:
    """ASGI endpoint for every slurmrestd path."""

    async def __call__(self, scope: Scope, receive: Receive, send_: Send) -> None:
        runtime: Runtime = scope["state"]["runtime"]
        settings = runtime.settings
        request_id = request_id_of(scope, settings.server.request_id_header.lower().encode())
        request_id_var.set(request_id)
        peer = scope["client"][0] if scope.get("client") else None
        record = AuditRecord(
            request_id=request_id,
            method=scope["method"],
            path=scope.get("raw_path", scope["path"].encode()).decode("latin-1")[:512],
            client=client_address(peer, _headers(scope, b"x-forwarded-for"), settings.server.trusted_proxies),
            peer=peer,
            user_agent=(_header(scope, b"user-agent") or "")[:256] or None,
        )
        try:
            reply = await self._handle(scope, receive, runtime, record)
        except ProxyError as error:
            reply = self._refused(record, error)
        except Exception:
            # A bug, not a decision: the caller still gets JSON, and the request still gets its record.
            logger.exception("%s %s failed unexpectedly", record.method, record.path)
            reply = self._refused(record, ProxyError("the proxy failed unexpectedly; see its log"))
        try:
            runtime.audit.emit(record)
        except AuditWriteError as exc:
            logger.error("%s; refusing the request", exc)
            await reply.discard()
            record.status, record.decision, record.reason = 503, "error", "audit_unavailable"
            reply = error_reply(
                DependencyError("the audit log cannot be written; refusing to answer", reason="audit_unavailable"),
                request_id,
            )
        runtime.metrics.observe_request(record)
        await reply.send(send_)

    @staticmethod
    def _refused(record: AuditRecord, error: ProxyError) -> Reply:
        record.status = error.status_code
        record.reason = error.reason
        record.detail = error.detail
        record.decision = "deny" if error.status_code < 500 else "error"
        if error.status_code >= 500:
            logger.warning("%s %s failed: %s (%s)", record.method, record.path, error.reason, error.detail)
        return error_reply(error, record.request_id)

    async def _handle(self, scope: Scope, receive: Receive, runtime: Runtime, record: AuditRecord) -> Reply:
        method: str = scope["method"]
        path = canonical_path(scope.get("raw_path") or scope["path"].encode())
        record.path = path
        query = check_query(scope.get("query_string", b""))

        principal = await runtime.tokens.authenticate(_headers(scope, b"authorization"))
        record.set_principal(principal)

        policy = runtime.policy  # a reload swaps the attribute; this request keeps the policy it started with
        limit = runtime.settings.server.max_body_bytes
        authorized = await authorize(
            scope,
            receive,
            read_body,
            policy=policy,
            principal=principal,
            path=path,
            limit=limit,
            stats=runtime.policy_stats,
            record=record,
        )
        decision = authorized.decision
        assert decision.rule is not None and decision.operation is not None
        runtime.rate_limiter.check(decision.rule, principal, decision.entitlement)

        await runtime.apis.check(path)  # 404 for an API version slurmrestd does not serve
        account = await runtime.mapper.map(policy, decision.rule, principal)
        record.local_user, record.mapping = account.name, account.source
        record.mapping_detail = account.detail

        content = authorized.body if authorized.body is not None else await _request_content(scope, receive, limit)
        rid_header = runtime.settings.server.request_id_header.lower().encode()
        forwarded = [(k, v) for k, v in client_headers(scope["headers"]) if normalized(k) != rid_header]
        credential = runtime.credentials.headers_for(account.name)
        headers = [*forwarded, *credential, (rid_header, record.request_id.encode())]
        length = str(len(authorized.body)) if authorized.body is not None else _header(scope, b"content-length")
        if length is not None:
            headers.append((b"content-length", length.encode()))
        runtime.audit.check_room()  # fail closed before slurmrestd acts, not after

        async def forward() -> UpstreamResponse:
            upstream = await send(
                runtime.upstream, method=method, path=path, query=query, headers=headers, content=content
            )
            record.upstream_status = upstream.status_code
            await runtime.upstream_auth.check(upstream, path=path, user=account.name, headers=credential)
            return upstream

        with record.upstream_timer():
            if content is None and runtime.shield.applies(method, path):
                key = (account.name, method, path, query, variant(forwarded))
                result = await runtime.shield.fetch(key, forward)
                record.served_from = result.source
                runtime.metrics.cache_lookup("shield", result.source != "upstream")
            else:
                result = ShieldResult("upstream", stream=await forward())
                record.served_from = "upstream"
        reply = _reply(result, record.request_id)
        record.upstream_status = record.status = reply.status
        record.decision, record.reason, record.detail = "allow", "allowed", None
        if decision.operation.group == "submit" and reply.stream is not None:
            reply.body = await reply.stream.body(MAX_INSPECTED_RESPONSE)
            await reply.stream.aclose()
            reply.stream = None
            reply.headers = [(k, v) for k, v in reply.headers if k.lower() != b"content-length"]
            reply.headers.append((b"content-length", str(len(reply.body)).encode()))
        if decision.operation.group == "submit":
            record.job_id = job_id_from(reply.body)
        return reply


def _reply(result: ShieldResult, request_id: str) -> Reply:
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
