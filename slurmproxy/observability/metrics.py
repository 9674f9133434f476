"""Prometheus metrics, served on ``metrics.path`` (default ``/metrics``).

One :class:`Metrics` object per process lives on the runtime (``runtime.metrics``). Components
report through its small API (documented in docs/operations.md, "Metrics"):

* ``observe_request(outcome)``: once per request the proxy answered, from its audit record
  (:class:`~slurmproxy.audit.AuditTrail` calls it when it writes the record);
* ``cache_lookup(cache, hit)``: a lookup in a cache (``token``, ``alise``, ``shield``);
* ``state_call(backend, seconds)``, ``state_error(backend, use, kind)``, ``state_fallback(use)``: the
  shared state (``slurmproxy.state``) answered, failed, or a request was decided without it;
* ``introspection_refused(reason)``: a new opaque token refused by the introspection budget;
* ``policy_load(ok, rules=...)``: the policy was loaded or reloaded (or failed to);
* ``audit_write(ok)``: an audit record was written (or could not be);
* ``transport(dependency)``: an httpx transport that counts and times every HTTP exchange.

With several uvicorn workers, ``slurmproxy serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at an empty
directory before the workers start, every worker writes its values there, and a scrape (answered by
any one worker) adds them up (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import httpx
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from slurmproxy import __version__
from slurmproxy.config.settings import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DEPENDENCY_PREFIXES = {"provider_": "provider", "alise_": "alise", "upstream_": "upstream"}


class RequestOutcome(Protocol):
    """What a request's metrics are made of: the fields of its audit record."""

    @property
    def decision(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def rule(self) -> str | None: ...
    @property
    def reason(self) -> str: ...
    @property
    def latency_ms(self) -> float: ...
    @property
    def upstream_ms(self) -> float | None: ...


class Metrics:
    """The proxy's metrics. Each instance has its own registry, so tests can build many apps in one process."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry = CollectorRegistry()
        if not self.multiprocess:  # process metrics are per process; multiprocess mode cannot add them up
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        build = Gauge("slurmproxy_build_info", "Always 1", ["version"], registry=r, multiprocess_mode="max")
        self.requests = Counter(
            "slurmproxy_requests", "Proxied requests", ["decision", "status", "rule", "reason"], registry=r
        )
        self.request_seconds = Histogram(
            "slurmproxy_request_duration_seconds",
            "Whole request, from arrival to the audit record (before the body streams)",
            ["decision"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "slurmproxy_upstream_duration_seconds",
            "The slurmrestd part of a request: until its response headers",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.dependency_requests = Counter(
            "slurmproxy_dependency_requests",
            "HTTP exchanges with a dependency, by outcome (status class or error kind)",
            ["dependency", "outcome"],
            registry=r,
        )
        self.dependency_seconds = Histogram(
            "slurmproxy_dependency_duration_seconds",
            "HTTP exchanges with a dependency",
            ["dependency"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.dependency_errors = Counter(
            "slurmproxy_dependency_errors",
            "Failures of the provider, ALISE or slurmrestd",
            ["dependency", "reason"],
            registry=r,
        )
        self.cache = Counter("slurmproxy_cache_requests", "Cache lookups", ["cache", "result"], registry=r)
        self.introspection_refusals = Counter(
            "slurmproxy_introspection_refusals",
            "Opaque tokens not seen before that were refused without introspection: the budget was spent",
            ["reason"],
            registry=r,
        )
        self.audit_records = Counter("slurmproxy_audit_records", "Audit records written", registry=r)
        self.audit_failures = Counter("slurmproxy_audit_write_failures", "Audit records not written", registry=r)
        self.policy_loads = Counter("slurmproxy_policy_loads", "Policy loads and reloads", ["result"], registry=r)
        self.policy_ok = Gauge(
            "slurmproxy_policy_last_load_success",
            "1 if the last policy load or reload succeeded (in every worker), else 0",
            registry=r,
            multiprocess_mode="min",
        )
        self.policy_time = Gauge(
            "slurmproxy_policy_last_success_timestamp_seconds",
            "When the policy in force was loaded",
            registry=r,
            multiprocess_mode="max",
        )
        self.policy_rules = Gauge(
            "slurmproxy_policy_rules", "Rules in the policy in force", registry=r, multiprocess_mode="mostrecent"
        )
        self.state_errors = Counter(
            "slurmproxy_state_errors",
            "Failed calls to the shared state (Redis, PostgreSQL), by what they were for and how they failed",
            ["backend", "use", "kind"],
            registry=r,
        )
        self.state_fallbacks = Counter(
            "slurmproxy_state_fallbacks",
            "Requests decided with this worker's own state because the shared state failed (the admin's choice)",
            ["use"],
            registry=r,
        )
        self.state_seconds = Histogram(
            "slurmproxy_state_duration_seconds",
            "Calls to the shared state that answered",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        build.labels(__version__).set(1)

    # -- the API ---------------------------------------------------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: prometheus-client takes a lock and builds the child each call."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            if len(self._children) < 10_000:  # label sets are few; the bound is a safety net
                self._children[key] = child
        return child

    def observe_request(self, record: RequestOutcome) -> None:
        self._child(self.requests, record.decision, str(record.status), record.rule or "", record.reason).inc()
        self._child(self.request_seconds, record.decision).observe(record.latency_ms / 1000)
        if record.upstream_ms is not None:
            self.upstream_seconds.observe(record.upstream_ms / 1000)
        for prefix, dependency in DEPENDENCY_PREFIXES.items():
            if record.reason.startswith(prefix):
                self.dependency_errors.labels(dependency, record.reason).inc()

    def cache_lookup(self, cache: str, hit: bool) -> None:
        self._child(self.cache, cache, "hit" if hit else "miss").inc()

    def introspection_refused(self, reason: str) -> None:
        self._child(self.introspection_refusals, reason).inc()

    def policy_load(self, ok: bool, *, rules: int | None = None) -> None:
        self.policy_loads.labels("success" if ok else "failure").inc()
        self.policy_ok.set(1 if ok else 0)
        if ok:
            self.policy_time.set(time.time())
            if rules is not None:
                self.policy_rules.set(rules)

    def state_call(self, backend: str, seconds: float) -> None:
        self._child(self.state_seconds, backend).observe(seconds)

    def state_error(self, backend: str, use: str, kind: str) -> None:
        self._child(self.state_errors, backend, use, kind).inc()

    def state_fallback(self, use: str) -> None:
        self._child(self.state_fallbacks, use).inc()

    def audit_write(self, ok: bool) -> None:
        (self.audit_records if ok else self.audit_failures).inc()

    def transport(self, dependency: str, inner: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncBaseTransport:
        return CountingTransport(self, dependency, inner or httpx.AsyncHTTPTransport())

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


class CountingTransport(httpx.AsyncBaseTransport):
    """Counts and times every exchange through ``inner``; errors are re-raised unchanged."""

    def __init__(self, metrics: Metrics, dependency: str, inner: httpx.AsyncBaseTransport) -> None:
        self._metrics = metrics
        self._dependency = dependency
        self._inner = inner

    def _count(self, outcome: str, started: float) -> None:
        self._metrics.dependency_requests.labels(self._dependency, outcome).inc()
        self._metrics.dependency_seconds.labels(self._dependency).observe(time.perf_counter() - started)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        try:
            response = await self._inner.handle_async_request(request)
        except httpx.TimeoutException:
            self._count("timeout", started)
            raise
        except httpx.ConnectError:
            self._count("connect_error", started)
            raise
        except httpx.HTTPError:
            self._count("error", started)
            raise
        self._count(f"{response.status_code // 100}xx", started)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def prepare_multiprocess(settings: Settings, workers: int) -> Path | None:
    """Before uvicorn starts several workers: an empty directory for their metric files, named in the environment.

    Returns the directory if this call created it (the caller removes it at exit), else None.
    """
    if workers < 2 or not settings.metrics.enabled or os.environ.get(MULTIPROC_ENV):
        return None
    configured = settings.metrics.multiprocess_dir
    if configured is not None:
        configured.mkdir(parents=True, exist_ok=True)
        for stale in configured.glob("*.db"):  # values of a previous run must not be added to this one's
            stale.unlink()
        os.environ[MULTIPROC_ENV] = str(configured)
        return None
    created = Path(tempfile.mkdtemp(prefix="slurmproxy-metrics-"))
    os.environ[MULTIPROC_ENV] = str(created)
    return created


def remove_multiprocess_dir(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        os.environ.pop(MULTIPROC_ENV, None)
