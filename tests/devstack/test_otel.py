"""The devstack's OTLP receiver (the OpenTelemetry Collector), fed by the OpenTelemetry Python SDK."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter

from devstack.otel import OtelCollector

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OtelCollector]:
    with OtelCollector(tmp_path_factory.mktemp("otel")) as col:
        yield col


def send_span(exporter: SpanExporter, service: str, name: str) -> tuple[str, str]:
    """One parent and one child span through the SDK; the (trace id, parent span id) as OTLP JSON has them."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("devstack-test")
    with tracer.start_as_current_span(name) as parent:
        parent.set_attribute("slurm.user", "alice")
        with tracer.start_as_current_span(f"{name}.child"):
            pass
    context = parent.get_span_context()
    provider.shutdown()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def test_spans_over_grpc_and_http(collector: OtelCollector) -> None:
    assert collector.startup_seconds < 5
    before = len(collector.spans())
    grpc_ids = send_span(GrpcSpanExporter(endpoint=collector.grpc_endpoint, insecure=True), "via-grpc", "forward")
    http_ids = send_span(HttpSpanExporter(endpoint=collector.traces_url), "via-http", "forward")
    spans = collector.wait_spans(before + 4)[before:]
    by_service = {(s["resource"]["service.name"], s["name"]): s for s in spans}
    for service, (trace_id, span_id) in (("via-grpc", grpc_ids), ("via-http", http_ids)):
        parent, child = by_service[(service, "forward")], by_service[(service, "forward.child")]
        assert parent["traceId"] == child["traceId"] == trace_id
        assert parent["spanId"] == span_id and child["parentSpanId"] == span_id
        assert parent["attributes"] == {"slurm.user": "alice"}
        assert parent["scope"] == "devstack-test"


def test_restart_keeps_received_spans_and_ports(collector: OtelCollector) -> None:
    send_span(HttpSpanExporter(endpoint=collector.traces_url), "before-restart", "op")
    count = len(collector.wait_spans(2))
    ports = (collector.grpc_port, collector.http_port)
    collector.restart()
    assert (collector.grpc_port, collector.http_port) == ports
    assert len(collector.spans()) == count
    send_span(GrpcSpanExporter(endpoint=collector.grpc_endpoint, insecure=True), "after-restart", "op")
    assert {s["resource"]["service.name"] for s in collector.wait_spans(count + 2)} >= {
        "before-restart",
        "after-restart",
    }


def test_kill_refuses_exports(collector: OtelCollector) -> None:
    collector.kill()
    assert collector.pids() == []
    with pytest.raises(httpx.ConnectError):
        httpx.post(collector.traces_url, json={"resourceSpans": []})
    collector.start()
    answer = httpx.post(collector.traces_url, json={"resourceSpans": []})
    assert answer.status_code == 200
