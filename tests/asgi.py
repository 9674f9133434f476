"""Run the app in-process with its lifespan, and talk to it through httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.types import Receive, Scope, Send

from slurmproxy.config.settings import Settings
from slurmproxy.pipeline.app import create_app


@asynccontextmanager
async def app_session(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, Any]]]:
    """A client of the running app, and the app's lifespan state (``state["runtime"]``)."""
    app = create_app(settings)
    async with app.router.lifespan_context(app) as state:
        app_state = dict(state or {})

        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            scope = dict(scope)
            scope["state"] = dict(app_state)
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state, client=("203.0.113.5", 4242))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as client:
            yield client, app_state


@asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_session(settings) as (client, _):
        yield client
