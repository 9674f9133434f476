"""The request pipeline for every slurmrestd path, readable top to bottom:

canonical path → token (``tokens``) → policy (``policy``) → API version served (``upstream``) →
local account (``identity``) → forward (``upstream``) → record (``audit``) → respond.

Each stage returns a value or raises a refusal; only this module writes what they return into the
audit record, and the record is written before the response starts, so a request the proxy answered
always has its record; a request that changes state also has its intent record, written before it is
forwarded, so nothing slurmrestd does is without one. The client's credentials never reach slurmrestd.
"""

from __future__ import annotations

import json
import logging

from starlette.types import Receive, Scope, Send

from slurmproxy.audit.record import AuditRecord
from slurmproxy.core.paths import canonical_path, check_query
from slurmproxy.errors import ProxyError
from slurmproxy.identity.guard import LocalAccount
from slurmproxy.observability.logs import request_id_var
from slurmproxy.pipeline.runtime import Runtime
from slurmproxy.policy import Authorized, PolicyRequest
from slurmproxy.upstream import Outgoing
from slurmproxy.upstream.shield import ShieldResult
from slurmproxy.web.replies import Reply, error_reply, reply_from
from slurmproxy.web.request import (
    Incoming,
    check_body_allowed,
    forwarded_body,
    headers_named,
    read_body,
    single_content_type,
)

logger = logging.getLogger("slurmproxy.proxy")
MAX_INSPECTED_RESPONSE = 1024 * 1024
JSON = "application/json"  # the content type of every job body the proxy forwards: it checked JSON
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})  # these get an intent record before forwarding


def job_id_from(body: bytes) -> int | None:
    """The job id in slurmrestd's answer to a submission (``job_id``, or ``result.job_id``)."""
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


async def finish(runtime: Runtime, record: AuditRecord, reply: Reply) -> Reply:
    """Write the record; if it cannot be written (fail-closed), the client gets the refusal instead."""
    refusal = await runtime.trail.finish(record)
    if refusal is None:
        return reply
    await reply.discard()
    return error_reply(refusal, record.request_id)


def refused(record: AuditRecord, error: ProxyError) -> Reply:
    record.refuse(error)
    if error.status_code >= 500:
        logger.warning("%s %s failed: %s (%s)", record.method, record.path, error.reason, error.detail)
    return error_reply(error, record.request_id)


class ProxyEndpoint:
    """ASGI endpoint for every slurmrestd path."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime: Runtime = scope["state"]["runtime"]
        request = Incoming.of(scope, runtime.settings.server)
        request_id_var.set(request.request_id)
        record = request.record(runtime.settings.server)
        try:
            reply = await self._handle(runtime, request, receive, record)
        except ProxyError as error:
            reply = refused(record, error)
        except Exception:
            # A bug, not a decision: the caller still gets JSON, and the request still gets its record.
            logger.exception("%s %s failed unexpectedly", record.method, record.path)
            reply = refused(record, ProxyError("the proxy failed unexpectedly; see its log"))
        reply = await finish(runtime, record, reply)
        await reply.send(send)

    async def _handle(self, runtime: Runtime, request: Incoming, receive: Receive, record: AuditRecord) -> Reply:
        limit = runtime.settings.server.max_body_bytes
        path = canonical_path(request.raw_path)
        record.path = path
        query = check_query(request.query)
        check_body_allowed(request, path)
        content_type = single_content_type(request.headers)

        principal = await runtime.tokens.authenticate(headers_named(request.headers, b"authorization"), record.client)
        record.set_principal(principal)

        wanted = PolicyRequest(request.method, path, content_type, request.header(b"content-length"))
        authorized = await runtime.authorizer.authorize(principal, wanted, lambda: read_body(receive, limit))
        record.set_rule(authorized.ref)

        await runtime.upstream.check_served(path)
        account = await runtime.mapper.map(authorized.policy, authorized.rule, principal)
        _note_account(record, account)

        owner = f"{principal.issuer}\n{principal.subject}"  # whose share of slurmrestd's connections it takes
        outgoing = await _outgoing(request, receive, limit, path, query, authorized, owner)
        runtime.trail.check_room()  # fail closed before slurmrestd acts, not after
        if request.method in STATE_CHANGING:
            await runtime.trail.intend(record)  # the record of what slurmrestd is asked to do, before it acts
        with record.upstream_timer():
            result = await runtime.upstream.forward(outgoing, account.name)
        return await _answer(record, result, authorized)


def _note_account(record: AuditRecord, account: LocalAccount) -> None:
    record.local_user, record.mapping, record.mapping_detail = account.name, account.source, account.detail


async def _outgoing(
    request: Incoming, receive: Receive, limit: int, path: str, query: bytes, authorized: Authorized, owner: str
) -> Outgoing:
    body: bytes | None
    length: str | None
    content_type = None
    if authorized.body is not None:  # a job request: exactly the body the policy checked, as the JSON it is
        body, length, content_type = authorized.body, str(len(authorized.body)), JSON
    else:
        body, length = await forwarded_body(request, receive, limit, path)
    headers = list(request.headers)
    return Outgoing(request.method, path, query, headers, body, length, request.request_id, content_type, owner)


async def _answer(record: AuditRecord, result: ShieldResult, authorized: Authorized) -> Reply:
    record.served_from = result.source
    reply = reply_from(result, record.request_id)
    record.upstream_status = reply.status
    record.allow(reply.status)
    if authorized.operation == "submit":
        if reply.stream is not None:  # the job id is in the answer: read it whole (it is small)
            reply.body = await reply.stream.body(MAX_INSPECTED_RESPONSE)
            await reply.stream.aclose()
            reply.stream = None
            reply.headers = [(k, v) for k, v in reply.headers if k.lower() != b"content-length"]
            reply.headers.append((b"content-length", str(len(reply.body)).encode()))
        record.job_id = job_id_from(reply.body)
    return reply
