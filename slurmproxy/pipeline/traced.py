"""Tracing, put in at the composition root: the stages know nothing of it.

:func:`instrument` wraps the one entry point of each stage object of a runtime (tokens, policy,
mapping, upstream, audit) in a span, and :class:`TracedEndpoint` wraps the proxy endpoint in the
request's server span. Both are applied only when ``tracing.endpoint`` is set, so with tracing off
the pipeline is the same objects and calls as without this module.

A stage's span is made only inside a request's span: the same entry points called from elsewhere
(``/_slurmproxy/whoami``, the audit records of connections the HTTP layer refused) make none. The
upstream span replaces the caller's ``traceparent`` and ``tracestate`` with its own, so slurmrestd
(and whatever reads its logs) sees the proxy's span as its parent, in the caller's trace.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.types import ASGIApp, Receive, Scope, Send

from slurmproxy.audit.record import AuditRecord
from slurmproxy.core.principal import Principal
from slurmproxy.errors import ProxyError
from slurmproxy.identity.guard import LocalAccount
from slurmproxy.observability.tracing import TRACE_HEADERS, Tracing, attributes
from slurmproxy.pipeline.runtime import Runtime
from slurmproxy.policy import Authorized
from slurmproxy.upstream import Outgoing
from slurmproxy.upstream.shield import ShieldResult

T = TypeVar("T")
REQUEST_SPAN = "slurmproxy request"


def _in_request() -> bool:
    from opentelemetry import trace

    return trace.get_current_span().get_span_context().is_valid


def _refusal(span: Any, error: ProxyError) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("slurmproxy.reason", error.reason)
    if error.status_code >= 500:
        span.set_status(Status(StatusCode.ERROR, error.reason))


def _traced(
    tracing: Tracing,
    name: str,
    call: Callable[..., Awaitable[T]],
    describe: Callable[[T], dict[str, Any]],
    *,
    kind: str = "INTERNAL",
    before: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None,
) -> Callable[..., Awaitable[T]]:
    from opentelemetry.trace import SpanKind

    span_kind = SpanKind[kind]

    @functools.wraps(call)
    async def traced(*args: Any, **kwargs: Any) -> T:
        if not _in_request():
            return await call(*args, **kwargs)
        with tracing.tracer.start_as_current_span(
            name, kind=span_kind, record_exception=False, set_status_on_exception=False
        ) as span:
            if before is not None:
                args = before(args)
            try:
                result = await call(*args, **kwargs)
            except ProxyError as error:
                _refusal(span, error)
                raise
            span.set_attributes(attributes(describe(result)))
            return result

    return traced


def _with_trace_headers(tracing: Tracing) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """The request to forward with the upstream span's ``traceparent`` instead of the caller's."""

    def before(args: tuple[Any, ...]) -> tuple[Any, ...]:
        outgoing: Outgoing = args[0]
        kept = [(k, v) for k, v in outgoing.headers if k.lower() not in TRACE_HEADERS]
        return (dataclasses.replace(outgoing, headers=kept + tracing.inject()), *args[1:])

    return before


def instrument(runtime: Runtime, tracing: Tracing) -> None:
    """Wrap each stage's entry point of ``runtime`` in its span (instance attributes: the classes are untouched)."""
    identity = tracing.include_identity

    def token(principal: Principal) -> dict[str, Any]:
        return {"slurmproxy.issuer": principal.issuer, "enduser.id": principal.subject if identity else None}

    def policy(authorized: Authorized) -> dict[str, Any]:
        ref = authorized.ref
        return {"slurmproxy.rule": ref.rule, "slurmproxy.operation": ref.operation}

    def mapping(account: LocalAccount) -> dict[str, Any]:
        return {"slurmproxy.mapping": account.source, "slurmproxy.local_user": account.name if identity else None}

    def upstream(result: ShieldResult) -> dict[str, Any]:
        status = result.shared.status_code if result.shared is not None else None
        if status is None and result.stream is not None:
            status = result.stream.status_code
        return {"slurmproxy.served_from": result.source, "http.response.status_code": status}

    tokens, authorizer, mapper, forward = runtime.tokens, runtime.authorizer, runtime.mapper, runtime.upstream
    setattr(tokens, "authenticate", _traced(tracing, "token", tokens.authenticate, token))  # noqa: B010
    setattr(authorizer, "authorize", _traced(tracing, "policy", authorizer.authorize, policy))  # noqa: B010
    setattr(mapper, "map", _traced(tracing, "mapping", mapper.map, mapping))  # noqa: B010
    traced_forward = _traced(
        tracing, "upstream", forward.forward, upstream, kind="CLIENT", before=_with_trace_headers(tracing)
    )
    setattr(forward, "forward", traced_forward)  # noqa: B010
    trail = runtime.trail
    setattr(trail, "finish", _finish_traced(tracing, trail.finish))  # noqa: B010


def _finish_traced(tracing: Tracing, finish: Callable[..., Any]) -> Callable[..., Any]:
    """The audit stage is synchronous (one ``write(2)``); its span also puts the request's outcome on the
    request's span, from the record: the one place that knows the decision for every path."""
    from opentelemetry import trace

    @functools.wraps(finish)
    def traced(record: AuditRecord, *args: Any, **kwargs: Any) -> Any:
        if not _in_request():
            return finish(record, *args, **kwargs)
        _describe_request(trace.get_current_span(), record, tracing.include_identity)
        with tracing.tracer.start_as_current_span("audit", record_exception=False) as span:
            refusal = finish(record, *args, **kwargs)
            span.set_attribute("slurmproxy.audit_written", refusal is None)
            return refusal

    return traced


def _describe_request(span: Any, record: AuditRecord, identity: bool) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attributes(
        attributes(
            {
                "slurmproxy.request_id": record.request_id,
                "url.path": record.path,
                "slurmproxy.decision": record.decision,
                "slurmproxy.reason": record.reason,
                "http.response.status_code": record.status,
                "slurmproxy.rule": record.rule,
                "slurmproxy.operation": record.operation,
                "slurmproxy.upstream_status": record.upstream_status,
                "slurmproxy.job_id": record.job_id,
                "slurmproxy.vo": record.vo,
                "enduser.id": record.subject if identity else None,
                "slurmproxy.local_user": record.local_user if identity else None,
            }
        )
    )
    if record.decision == "error":
        span.set_status(Status(StatusCode.ERROR, record.reason))


class TracedEndpoint:
    """The request's server span around the proxy endpoint, in the caller's trace if it sent one."""

    def __init__(self, inner: ASGIApp) -> None:
        self.inner = inner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime: Runtime = scope["state"]["runtime"]
        tracing = runtime.tracing
        if tracing is None or scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        from opentelemetry.trace import SpanKind

        parent = tracing.extract(scope["headers"])
        with tracing.tracer.start_as_current_span(
            REQUEST_SPAN,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "url.path": scope["path"]},
            record_exception=False,
        ):
            await self.inner(scope, receive, send)
