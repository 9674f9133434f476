"""Traces from the real proxy server to the real OpenTelemetry Collector (OTLP/HTTP and OTLP/gRPC), for
requests against real Slurm with tokens from the real provider: one trace per request, in the caller's
trace, a span per stage, the request id and decision as attributes, never the token or the subject."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from devstack import SlurmCluster
from devstack.otel import OtelCollector, Span
from devstack.provider import PROXY_AUDIENCE, OidcProvider
from devstack.proxy import ProxyServer
from tests.integration.conftest import call, proxy_config, records_for, site_policy

STAGES = {"token", "policy", "mapping", "upstream", "audit"}
# The proxy's batch processor sends every 200 ms here (OTEL_BSP_SCHEDULE_DELAY); the wait is far above it.
EXPORT_DELAY_MS = 200
WAIT = 30.0


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OtelCollector]:
    with OtelCollector(tmp_path_factory.mktemp("otel")) as col:
        yield col


@pytest.fixture(scope="module", params=["http/protobuf", "grpc"])
def traced_proxy(
    request: pytest.FixtureRequest,
    slurm: SlurmCluster,
    oidc: OidcProvider,
    collector: OtelCollector,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ProxyServer]:
    protocol = request.param
    tracing: dict[str, Any] = {"protocol": protocol, "service_name": f"slurmproxy-{protocol.split('/')[0]}"}
    if protocol == "grpc":
        tracing.update(endpoint=collector.grpc_endpoint, insecure=True)
    else:
        tracing.update(endpoint=collector.traces_url)
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    config = proxy_config(slurm, [issuer], tracing=tracing)
    env = {"OTEL_BSP_SCHEDULE_DELAY": str(EXPORT_DELAY_MS)}
    with ProxyServer(tmp_path_factory.mktemp("traced"), config, {"site.yaml": site_policy(oidc.issuer)}, env=env) as p:
        yield p


def trace_of(collector: OtelCollector, trace_id: str, count: int) -> list[Span]:
    """The spans of one trace, once ``count`` of them arrived (the collector also holds other tests' spans)."""
    deadline = time.monotonic() + WAIT
    while True:
        spans = [s for s in collector.spans() if s["traceId"] == trace_id]
        if len(spans) >= count:
            return spans
        assert time.monotonic() < deadline, f"{len(spans)} spans of trace {trace_id} after {WAIT} s, expected {count}"
        time.sleep(0.05)


def test_a_request_is_a_trace_of_its_stages_in_the_callers_trace(
    traced_proxy: ProxyServer, collector: OtelCollector, oidc: OidcProvider, api: str, request_id: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    response = call(
        traced_proxy,
        "GET",
        f"{api}/ping",
        token=token,
        request_id=request_id,
        headers={"traceparent": f"00-{trace_id}-{caller_span}-01"},
    )
    assert response.status_code == 200
    spans = trace_of(collector, trace_id, 1 + len(STAGES))
    by_name = {s["name"]: s for s in spans}
    assert set(by_name) == {"slurmproxy request", *STAGES}
    root = by_name["slurmproxy request"]
    assert root["parentSpanId"] == caller_span
    assert {by_name[s]["parentSpanId"] for s in STAGES} == {root["spanId"]}
    assert root["resource"]["service.name"] == traced_proxy.config["tracing"]["service_name"]
    attrs = root["attributes"]
    assert attrs["slurmproxy.request_id"] == request_id
    assert attrs["slurmproxy.decision"] == "allow" and attrs["slurmproxy.operation"] == "ping"
    assert by_name["upstream"]["kind"] in (3, "SPAN_KIND_CLIENT")
    (record,) = records_for(traced_proxy, request_id)
    assert record["decision"] == "allow"
    text = json.dumps(spans)
    assert token not in text and token.split(".")[1] not in text
    assert record["subject"] not in text and "alice" not in text


def test_a_refused_request_has_its_reason(
    traced_proxy: ProxyServer, collector: OtelCollector, api: str, request_id: str
) -> None:
    trace_id = secrets.token_hex(16)
    response = call(
        traced_proxy,
        "GET",
        f"{api}/ping",
        token="not-a-token",
        request_id=request_id,
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
    )
    assert response.status_code == 401
    by_name = {s["name"]: s for s in trace_of(collector, trace_id, 3)}
    assert set(by_name) == {"slurmproxy request", "token", "audit"}
    assert by_name["slurmproxy request"]["attributes"]["slurmproxy.decision"] == "deny"
    assert by_name["token"]["attributes"]["slurmproxy.reason"] == "malformed_token"
