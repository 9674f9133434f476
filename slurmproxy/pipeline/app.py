"""Application assembly: lifespan, the proxy's own endpoints, and the catch-all proxy route.

The proxy's own endpoints live under ``/_slurmproxy/`` (never a slurmrestd path):

* ``/_slurmproxy/live``: liveness, no I/O;
* ``/_slurmproxy/ready``: readiness: keys loaded for every issuer, policy loaded (and whether the
  last reload failed), slurmrestd answering. Everyone gets the status; only a caller whose token a
  rule of the policy admits gets the details (they name files, subjects and slurmrestd's state),
  and every change of them is logged;
* ``/_slurmproxy/whoami``: who the proxy thinks the caller is, and what they may do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from slurmproxy.config.settings import Settings, load_settings
from slurmproxy.errors import DependencyError, ProxyError
from slurmproxy.observability.logs import configure_logging
from slurmproxy.pipeline.proxy import ProxyEndpoint
from slurmproxy.pipeline.runtime import Runtime, open_runtime
from slurmproxy.pipeline.traced import TracedEndpoint, instrument
from slurmproxy.pipeline.whoami import WhoamiEndpoint, policy_details
from slurmproxy.policy.rules import admitting
from slurmproxy.tokens.provider import ProviderClient
from slurmproxy.web.deadlines import BodyDeadline
from slurmproxy.web.metrics_listener import MetricsListener
from slurmproxy.web.replies import json_response
from slurmproxy.web.request import Incoming, headers_named

logger = logging.getLogger("slurmproxy")
CONFIG_ENV = "SLURMPROXY_CONFIG"
PREFIX = "/_slurmproxy"
_READY_CACHE_SECONDS = 2.0


async def live(request: Request) -> Response:
    return json_response({"status": "ok"})


async def _keys_loaded(runtime: Runtime) -> dict[str, str]:
    result: dict[str, str] = {}
    for provider in runtime.providers:
        if not provider.keys_loaded:
            try:
                await provider.refresh_keys()
            except DependencyError as exc:
                result[provider.issuer] = f"keys not loaded: {exc.detail}"
                continue
        result[provider.issuer] = "keys loaded"
    return result


async def _may_see_details(request: Request, runtime: Runtime) -> bool:
    """Whether the caller's token is valid and a rule of the policy in force admits them."""
    headers = headers_named(request.scope["headers"], b"authorization")
    if not headers:
        return False
    client = Incoming.of(request.scope, runtime.settings.server).record(runtime.settings.server).client
    try:
        principal = await runtime.tokens.authenticate(headers, client)
    except ProxyError:
        return False
    return next(admitting(runtime.policy, principal), None) is not None


def _log_change(cache: dict[str, Any], body: dict[str, Any]) -> None:
    """The details, in the log whenever they change (not at every probe)."""
    text = json.dumps(body, sort_keys=True, default=str)
    if cache.get("logged") == text:
        return
    cache["logged"] = text
    level = logging.INFO if body["status"] == "ready" else logging.WARNING
    logger.log(level, "readiness: %s: %s", body["status"], text)


async def ready(request: Request) -> Response:
    runtime: Runtime = request.state.runtime
    cache: dict[str, Any] = request.state.ready_cache
    details = await _may_see_details(request, runtime)
    now = time.monotonic()
    if cache.get("until", 0.0) > now:
        return json_response(cache["body"] if details else {"status": cache["body"]["status"]}, cache["status"])
    upstream_ok, upstream_detail = await runtime.upstream.answers()
    keys = await _keys_loaded(runtime)
    keys_ok = all(v == "keys loaded" for v in keys.values()) and bool(keys)
    body = {
        "status": "ready" if upstream_ok and keys_ok else "not ready",
        "checks": {
            "issuers": keys,
            "policy": policy_details(runtime),
            "upstream": upstream_detail,
            **runtime.upstream.report(),
        },
    }
    status = 200 if upstream_ok and keys_ok else 503
    cache.update(until=now + _READY_CACHE_SECONDS, body=body, status=status)
    _log_change(cache, body)
    return json_response(body if details else {"status": body["status"]}, status)


async def metrics_endpoint(request: Request) -> Response:
    runtime: Runtime = request.state.runtime
    return Response(await run_in_threadpool(runtime.metrics.render), media_type=CONTENT_TYPE_LATEST)


def on_main_port(settings: Settings) -> bool:
    """Whether the main port serves the metrics (enabled, and no ``metrics.port`` of their own)."""
    return settings.metrics.enabled and settings.metrics.port is None


def metrics_routes(settings: Settings) -> list[Route]:
    return [Route(settings.metrics.path, metrics_endpoint, methods=["GET"])] if on_main_port(settings) else []


@asynccontextmanager
async def metrics_listener(settings: Settings, runtime: Runtime) -> AsyncIterator[MetricsListener | None]:
    """The metrics' own listener, while the app runs, if ``metrics.port`` asks for one."""
    if not settings.metrics.enabled or settings.metrics.port is None:
        yield None
        return
    listener = MetricsListener(
        runtime.metrics.render, settings.metrics.path, header_timeout=settings.server.header_timeout_seconds
    )
    await listener.start(settings.metrics.host or settings.server.host, settings.metrics.port)
    try:
        yield listener
    finally:
        await listener.aclose()


async def _warm(runtime: Runtime) -> None:
    async def one(provider: ProviderClient) -> None:
        try:
            await provider.refresh_keys()
        except DependencyError as exc:
            logger.warning("could not load keys for %s at start-up: %s", provider.issuer, exc.detail)

    await asyncio.gather(*(one(p) for p in runtime.providers))


class SlurmProxyApp:
    """The proxy's own endpoints (under /_slurmproxy/, and the metrics path) go through Starlette; every other
    request goes straight into the pipeline, without routing and middleware layers on the hot path."""

    def __init__(self, own: Starlette, proxy: ASGIApp, metrics_path: str | None) -> None:
        self.starlette = own
        self.router = own.router
        self._proxy = proxy
        self._metrics_path = metrics_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if not path.startswith(PREFIX + "/") and path != self._metrics_path:
                await self._proxy(scope, receive, send)
                return
        await self.starlette(scope, receive, send)


def create_app(settings: Settings | None = None) -> SlurmProxyApp:
    """Build the ASGI app. Without settings, reads the file named by $SLURMPROXY_CONFIG (for uvicorn workers)."""
    if settings is None:
        path = os.environ.get(CONFIG_ENV)
        settings = load_settings(Path(path) if path else None)
        configure_logging(settings.log)  # in a uvicorn worker process, which did not run `serve`'s set-up
    final_settings = settings

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with open_runtime(final_settings) as runtime, metrics_listener(final_settings, runtime):
            if runtime.tracing is not None:
                instrument(runtime, runtime.tracing)
            # Load keys in the background: readiness reports them; a provider outage must not block start-up.
            warm = asyncio.create_task(_warm(runtime))
            try:
                yield {"runtime": runtime, "ready_cache": {}}
            finally:
                warm.cancel()
                await asyncio.gather(warm, return_exceptions=True)

    endpoint: ASGIApp = ProxyEndpoint()
    if final_settings.tracing.enabled:  # off: not even the check of whether it is on, per request
        endpoint = TracedEndpoint(endpoint)
    proxy = BodyDeadline(endpoint)
    routes = [
        Route(f"{PREFIX}/live", live, methods=["GET"]),
        Route(f"{PREFIX}/ready", ready, methods=["GET"]),
        Route(f"{PREFIX}/whoami", WhoamiEndpoint(), methods=["GET"]),
        *metrics_routes(final_settings),
        Route("/{path:path}", proxy),  # reached only through the Starlette app (own paths that match no route)
    ]
    own = Starlette(routes=routes, lifespan=lifespan)
    # Targets no route matches (a decoded CR/LF in the path, "*") still get the proxy's JSON 400 and a record.
    own.router.default = proxy
    return SlurmProxyApp(own, proxy, final_settings.metrics.path if on_main_port(final_settings) else None)
