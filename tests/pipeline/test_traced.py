"""Traces of proxied requests: one server span per request with a span per stage, in the caller's trace,
what the spans may and may not say, the traceparent slurmrestd gets, and tracing off changing nothing.

Spans are caught by the SDK's in-memory exporter here; tests/integration/test_traces.py sends them to a
real OpenTelemetry Collector over OTLP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pytest_httpx import HTTPXMock

from slurmproxy.config.settings import Settings, TracingSettings
from slurmproxy.observability import tracing as tracing_module
from slurmproxy.pipeline.app import create_app
from slurmproxy.pipeline.proxy import ProxyEndpoint
from slurmproxy.pipeline.traced import REQUEST_SPAN, TracedEndpoint
from tests.asgi import app_client, app_session
from tests.fakeupstream import ThreadedFakeSlurmrestd as Upstream
from tests.helpers import UPSTREAM, Signer, make_settings

pytestmark = pytest.mark.anyio
PING = "/slurm/v0.0.38/ping"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
STAGES = ["token", "policy", "mapping", "upstream", "audit"]


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    monkeypatch.setattr(tracing_module, "_exporter", lambda settings: exporter)
    yield exporter


def traced_settings(tmp_path: Path, **tracing: Any) -> Settings:
    return make_settings(tmp_path, tracing={"endpoint": "http://127.0.0.1:9/v1/traces", **tracing})


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def all_attribute_values(spans: tuple[ReadableSpan, ...]) -> str:
    return json.dumps([dict(span.attributes or {}) for span in spans] + [span.name for span in spans])


async def test_a_request_is_one_span_per_stage_in_the_callers_trace(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream, exported: InMemorySpanExporter
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{PING}", json={"pings": [], "errors": []})
    token = signer.token()
    headers = {
        "Authorization": f"Bearer {token}",
        "X-Request-ID": "trace-req-1",
        "traceparent": TRACEPARENT,
        "tracestate": "caller=1",
    }
    async with app_client(traced_settings(tmp_path)) as client:
        response = await client.get(PING, headers=headers)
    assert response.status_code == 200
    spans = exported.get_finished_spans()
    named = by_name(spans)
    assert sorted(named) == sorted([REQUEST_SPAN, *STAGES])
    request = named[REQUEST_SPAN]
    assert request.context is not None and request.parent is not None
    assert f"{request.context.trace_id:032x}" == CALLER_TRACE
    assert f"{request.parent.span_id:016x}" == CALLER_SPAN
    for stage in STAGES:
        span = named[stage]
        assert span.parent is not None and span.parent.span_id == request.context.span_id, stage
    attrs = dict(request.attributes or {})
    assert attrs["slurmproxy.request_id"] == "trace-req-1"
    assert attrs["slurmproxy.decision"] == "allow" and attrs["http.response.status_code"] == 200
    assert attrs["slurmproxy.rule"] == "members" and attrs["slurmproxy.operation"] == "ping"
    assert dict(named["mapping"].attributes or {}) == {"slurmproxy.mapping": "table:users"}
    # Never the token, nor (without include_identity) the subject or the local account.
    text = all_attribute_values(spans)
    assert token not in text and token.split(".")[1] not in text
    assert "alice" not in text and "enduser.id" not in text
    # slurmrestd is told the proxy's upstream span, in the caller's trace; the caller's tracestate is gone.
    (sent,) = upstream.get_requests()
    upstream_span = named["upstream"]
    assert upstream_span.context is not None
    assert sent.headers.get_list("traceparent") == [f"00-{CALLER_TRACE}-{upstream_span.context.span_id:016x}-01"]
    assert "tracestate" not in sent.headers or sent.headers["tracestate"] == "caller=1"


async def test_a_refusal_names_its_reason_and_no_later_stage(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream, exported: InMemorySpanExporter
) -> None:
    async with app_client(traced_settings(tmp_path)) as client:
        response = await client.get(PING, headers={"X-Request-ID": "trace-deny"})
    assert response.status_code == 401
    named = by_name(exported.get_finished_spans())
    assert sorted(named) == sorted([REQUEST_SPAN, "token", "audit"])
    assert dict(named["token"].attributes or {})["slurmproxy.reason"] == "missing_token"
    attrs = dict(named[REQUEST_SPAN].attributes or {})
    assert attrs["slurmproxy.decision"] == "deny" and attrs["slurmproxy.reason"] == "missing_token"
    assert attrs["slurmproxy.request_id"] == "trace-deny" and attrs["http.response.status_code"] == 401


async def test_identity_only_when_the_admin_opts_in(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream, exported: InMemorySpanExporter
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{PING}", json={"pings": [], "errors": []})
    async with app_client(traced_settings(tmp_path, include_identity=True)) as client:
        response = await client.get(PING, headers={"Authorization": f"Bearer {signer.token()}"})
    assert response.status_code == 200
    named = by_name(exported.get_finished_spans())
    attrs = dict(named[REQUEST_SPAN].attributes or {})
    assert attrs["enduser.id"] == "alice@example.org" and attrs["slurmproxy.local_user"] == "alice"
    # A request without a traceparent starts its own trace, and slurmrestd is told that one.
    assert named[REQUEST_SPAN].parent is None
    (sent,) = upstream.get_requests()
    context = named["upstream"].context
    assert context is not None
    version, trace_id, span_id, flags = sent.headers["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert int(flags, 16) & 1  # sampled (newer SDKs also set the "random trace id" flag, 0x02)


async def test_with_tracing_off_the_pipeline_is_untouched_and_traceparent_passes_through(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{PING}", json={"pings": [], "errors": []})
    settings = make_settings(tmp_path)
    assert settings.tracing == TracingSettings() and not settings.tracing.enabled
    app = create_app(settings)
    assert isinstance(app._proxy.app, ProxyEndpoint)  # type: ignore[attr-defined]
    async with app_session(settings) as (client, state):
        runtime = state["runtime"]
        assert runtime.tracing is None
        # No stage entry point is wrapped: each is still the class's own method.
        for obj, name in [
            (runtime.tokens, "authenticate"),
            (runtime.authorizer, "authorize"),
            (runtime.mapper, "map"),
            (runtime.upstream, "forward"),
            (runtime.trail, "finish"),
        ]:
            assert name not in vars(obj), name
        response = await client.get(
            PING, headers={"Authorization": f"Bearer {signer.token()}", "traceparent": TRACEPARENT}
        )
    assert response.status_code == 200
    (sent,) = upstream.get_requests()
    assert sent.headers["traceparent"] == TRACEPARENT


def test_with_tracing_on_the_endpoint_is_wrapped(tmp_path: Path) -> None:
    app = create_app(traced_settings(tmp_path))
    assert isinstance(app._proxy.app, TracedEndpoint)  # type: ignore[attr-defined]


def test_the_headers_file_is_read_and_errors_name_the_line_not_the_value(tmp_path: Path) -> None:
    from slurmproxy.errors import ConfigError

    good = tmp_path / "headers"
    good.write_text("# the collector's key\nAuthorization: Bearer s3cret\n\nX-Tenant: hpc\n")
    assert tracing_module.read_headers_file(good) == {"authorization": "Bearer s3cret", "x-tenant": "hpc"}
    bad = tmp_path / "bad"
    bad.write_text("Authorization Bearer s3cret\n")
    with pytest.raises(ConfigError) as caught:
        tracing_module.read_headers_file(bad)
    assert "line 1" in str(caught.value.detail) and "s3cret" not in str(caught.value.detail)


def test_an_http_endpoint_must_be_a_url() -> None:
    with pytest.raises(ValueError, match="http"):
        TracingSettings(endpoint="127.0.0.1:4318")
    assert TracingSettings(endpoint="127.0.0.1:4317", protocol="grpc", insecure=True).enabled


def test_with_tracing_off_opentelemetry_is_not_even_imported(tmp_path: Path) -> None:
    """The proxy's modules, the app and its runtime with tracing off: no OpenTelemetry module is loaded."""
    import subprocess
    import sys

    settings = make_settings(tmp_path)
    script = (
        "import asyncio, sys\n"
        "from slurmproxy.config.settings import load_settings\n"
        "from slurmproxy.pipeline.app import create_app\n"
        "from slurmproxy.pipeline.runtime import open_runtime\n"
        "import slurmproxy.commands.serve, slurmproxy.cli\n"
        f"settings = load_settings(__import__('pathlib').Path({str(tmp_path / 'config.yaml')!r}))\n"
        "create_app(settings)\n"
        "async def main():\n"
        "    async with open_runtime(settings) as runtime:\n"
        "        assert runtime.tracing is None\n"
        "asyncio.run(main())\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "print(loaded)\n"
    )
    assert not settings.tracing.enabled
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_tracing_without_the_extra_installed_stops_start_up_with_the_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from slurmproxy.commands.serve import validate
    from slurmproxy.errors import ConfigError

    traced_settings(tmp_path)
    real = importlib.util.find_spec

    def without_exporter(name: str, package: str | None = None) -> Any:
        return None if name.startswith("opentelemetry.exporter") else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", without_exporter)
    with pytest.raises(ConfigError, match=r"pip install 'slurmproxy\[tracing\]'"):
        validate(tmp_path / "config.yaml")
