"""OpenTelemetry traces, exported over OTLP when ``tracing.endpoint`` is set; otherwise nothing at all.

Off (the default) costs nothing: this module does not import OpenTelemetry, and the pipeline is built
without the traced wrappers (:mod:`slurmproxy.pipeline.traced`), so a request runs exactly the code
it ran before tracing existed. On, each proxied request is one server span with a child span per
stage (token, policy, mapping, upstream, audit), in the trace of the caller's W3C ``traceparent``
if it sent one; slurmrestd then gets a ``traceparent`` naming the proxy's upstream span. Spans go
to the collector from a background thread (the SDK's batch processor), never from the event loop.

What a span may carry is decided here, once: the request id, method, path, the decision, reason,
status, rule, operation and mapping kind. Never a token or a header value; the subject, the issuer's
identity for a person and the local account only with ``tracing.include_identity``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slurmproxy.config.settings import TracingSettings
from slurmproxy.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

TRACE_HEADERS = (b"traceparent", b"tracestate")
EXTRA_HINT = "install the tracing extra: pip install 'slurmproxy[tracing]'"
_MODULES = {
    "http/protobuf": ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"),
    "grpc": ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.grpc"),
}


def read_headers_file(path: Path) -> dict[str, str]:
    """``Name: value`` lines (blank lines and ``#`` comments ignored); errors name the line, never a value."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"tracing.headers_file: cannot read {path}: {exc.strerror}") from None
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            raise ConfigError(f"tracing.headers_file: {path} line {number} is not 'Name: value'")
        headers[name.strip().lower()] = value.strip()
    return headers


def check_tracing(settings: TracingSettings) -> None:
    """At start-up and in ``check-config``: the packages are there and the headers file reads."""
    if not settings.enabled:
        return
    for module in _MODULES[settings.protocol]:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ConfigError(f"tracing.endpoint is set but {module} is missing: {EXTRA_HINT}")
    if settings.headers_file is not None:
        read_headers_file(settings.headers_file)
    if settings.ca_file is not None and not settings.ca_file.is_file():
        raise ConfigError(f"tracing.ca_file: {settings.ca_file} is not a file")


def _exporter(settings: TracingSettings) -> SpanExporter:
    headers = read_headers_file(settings.headers_file) if settings.headers_file is not None else None
    assert settings.endpoint is not None
    if settings.protocol == "grpc":
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        credentials = None
        if settings.ca_file is not None:
            credentials = grpc.ssl_channel_credentials(settings.ca_file.read_bytes())
        return GrpcExporter(
            endpoint=settings.endpoint,
            insecure=settings.insecure,
            credentials=credentials,
            headers=headers,
            timeout=settings.timeout_seconds,
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(
        endpoint=settings.endpoint,
        certificate_file=str(settings.ca_file) if settings.ca_file is not None else None,
        headers=headers,
        timeout=settings.timeout_seconds,
    )


class Tracing:
    """The tracer, the W3C propagator, and what the spans may say (``include_identity``)."""

    def __init__(self, settings: TracingSettings, exporter: SpanExporter | None = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from slurmproxy import __version__

        self.settings = settings
        self.include_identity = settings.include_identity
        resource = Resource.create({"service.name": settings.service_name, "service.version": __version__})
        self.provider: TracerProvider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio))
        )
        self.provider.add_span_processor(BatchSpanProcessor(exporter or _exporter(settings)))
        self.tracer: Tracer = self.provider.get_tracer("slurmproxy", __version__)
        self._propagator = TraceContextTextMapPropagator()

    def extract(self, headers: Iterable[tuple[bytes, bytes]]) -> Context:
        """The caller's trace context (W3C ``traceparent``/``tracestate``); an invalid one starts a new trace."""
        carrier: dict[str, str] = {}
        for name, value in headers:
            lowered = name.lower()
            if lowered in TRACE_HEADERS and lowered.decode() not in carrier:
                carrier[lowered.decode()] = value.decode("latin-1")
        return self._propagator.extract(carrier)

    def inject(self) -> list[tuple[bytes, bytes]]:
        """``traceparent`` (and ``tracestate``) for the current span, as headers to send on."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return [(name.encode(), value.encode("latin-1")) for name, value in carrier.items()]

    def force_flush(self, timeout_seconds: float = 10.0) -> bool:
        return bool(self.provider.force_flush(int(timeout_seconds * 1000)))

    def shutdown(self) -> None:
        """Export what is left (bounded by the exporter's timeout) and stop the export thread."""
        self.provider.shutdown()


def open_tracing(settings: TracingSettings) -> Tracing | None:
    """The tracing of a running proxy, or None when it is off (nothing is imported then)."""
    if not settings.enabled:
        return None
    check_tracing(settings)
    return Tracing(settings)


def attributes(values: Mapping[str, Any]) -> dict[str, Any]:
    """Span attributes without the unset ones (OpenTelemetry refuses None)."""
    return {key: value for key, value in values.items() if value is not None}
