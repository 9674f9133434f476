"""The API versions slurmrestd serves, learned from its own OpenAPI document.

slurmrestd lists every path it answers in ``GET /openapi/v3``: ``/slurm/v0.0.38/…`` on Slurm 22.05,
``/slurm/v0.0.40/…`` to ``/slurm/v0.0.42/…`` on 24.11, ``/slurmdb/…`` when slurmdbd is configured.
The proxy reads the document

* at start-up, in the background, retrying every ``RETRY_SECONDS`` until slurmrestd answers;
* then every ``upstream.api_versions_refresh_seconds``;
* on demand, when a request names a version it does not know (at most once every
  ``ON_DEMAND_SECONDS``), so an upgraded slurmrestd is noticed without a restart.

A request for ``/<api>/<version>/…`` that slurmrestd does not serve gets a 404 listing what it
serves. While nothing is known yet (slurmrestd down since start-up), requests are forwarded and
slurmrestd answers for itself.

slurmrestd wants credentials even for this document (22.05 and 24.11 answer 401 without), though it
makes no RPC to slurmctld for it. The proxy presents the same kind of credential it uses for
requests, for ``upstream.discovery_user`` (default ``nobody``): never root or the SlurmUser.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from slurmproxy.config.settings import UpstreamSettings
from slurmproxy.core.flight import SingleFlight
from slurmproxy.core.slurmrest import OPENAPI_DOCUMENT, requested_api, version_key
from slurmproxy.errors import ApiVersionNotServedError, ProxyError
from slurmproxy.upstream.client import ConnectionPool
from slurmproxy.upstream.credentials import SlurmCredentials
from slurmproxy.upstream.exchange import fetch

logger = logging.getLogger("slurmproxy.apiversions")

DOCUMENT_PATH = OPENAPI_DOCUMENT
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
RETRY_SECONDS = 5.0
ON_DEMAND_SECONDS = 10.0
FETCH_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class ServedApis:
    """API name (the first path segment: ``slurm``, ``slurmdb``) → versions served, oldest first."""

    apis: Mapping[str, tuple[str, ...]]

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(sorted({v for versions in self.apis.values() for v in versions}, key=version_key))

    def serves(self, api: str, version: str) -> bool:
        return version in self.apis.get(api, ())

    def as_dict(self) -> dict[str, list[str]]:
        return {api: list(versions) for api, versions in sorted(self.apis.items())}


def parse_document(document: Any) -> ServedApis:
    """The versioned APIs an OpenAPI document lists; ValueError if it lists none."""
    paths = document.get("paths") if isinstance(document, dict) else None
    if not isinstance(paths, dict):
        raise ValueError("the answer is not an OpenAPI document (no 'paths')")
    found: dict[str, set[str]] = {}
    for path in paths:
        api = requested_api(path) if isinstance(path, str) else None
        if api is not None:
            found.setdefault(api[0], set()).add(api[1])
    if not found:
        raise ValueError("the OpenAPI document lists no versioned paths")
    return ServedApis({api: tuple(sorted(versions, key=version_key)) for api, versions in found.items()})


def _stamp(wall: float | None) -> str | None:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds") if wall is not None else None


class ApiVersions:
    """Tracks what slurmrestd serves. ``served`` is None until the document has been read once."""

    def __init__(
        self,
        client: ConnectionPool,
        credentials: SlurmCredentials,
        settings: UpstreamSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._credentials = credentials
        self._user = settings.discovery_user
        self._interval = float(settings.api_versions_refresh_seconds)
        self._timeout = min(FETCH_TIMEOUT_SECONDS, settings.timeout_seconds)
        self._clock = clock
        self._wall = wall_clock
        self.served: ServedApis | None = None
        self.error: str | None = None
        self.read_at: float | None = None  # wall clock of the last successful read
        self._attempted = float("-inf")
        self._flight: SingleFlight[str, None] = SingleFlight()
        self._loop: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._interval > 0

    @property
    def versions(self) -> tuple[str, ...]:
        return self.served.versions if self.served is not None else ()

    async def _fetch(self) -> ServedApis:
        headers = [(b"x-request-id", b"slurmproxy-api-versions"), *self._credentials.headers_for(self._user)]
        try:
            status, body = await fetch(
                self._client, "GET", DOCUMENT_PATH, headers, limit=MAX_DOCUMENT_BYTES, timeout=self._timeout
            )
        except ProxyError as exc:
            if exc.reason == "upstream_too_large":
                raise ValueError(f"the document is larger than {MAX_DOCUMENT_BYTES} bytes") from exc
            raise ValueError(exc.detail) from exc
        if status != 200:
            raise ValueError(f"slurmrestd answered HTTP {status}")
        # The document is large (660 KB on 24.11): parse it off the event loop.
        return await asyncio.to_thread(lambda: parse_document(json.loads(body)))

    async def _refresh_once(self) -> None:
        self._attempted = self._clock()
        try:
            served = await self._fetch()
        except ValueError as exc:
            self.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            logger.warning("could not read slurmrestd's API versions from %s: %s", DOCUMENT_PATH, self.error)
            return
        if served != self.served:
            logger.info("slurmrestd serves %s", served.as_dict())
        self.served, self.error, self.read_at = served, None, self._wall()

    async def refresh(self) -> None:
        """Read the document now; concurrent callers share one read. Failures are kept in ``error``."""
        await self._flight.run(DOCUMENT_PATH, self._refresh_once)

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval if self.error is None else min(RETRY_SECONDS, self._interval))

    def start(self) -> None:
        if self.enabled and self._loop is None:
            self._loop = asyncio.create_task(self._run())

    async def aclose(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        await self._flight.aclose()

    async def check(self, path: str) -> None:
        """Raise ApiVersionNotServedError if ``path`` names an API version slurmrestd does not serve."""
        wanted = requested_api(path)
        if wanted is None or not self.enabled:
            return
        if self.served is not None and self.served.serves(*wanted):
            return
        reading = DOCUMENT_PATH in self._flight
        if reading or self._clock() - self._attempted >= ON_DEMAND_SECONDS:
            await self.refresh()
        if self.served is not None and not self.served.serves(*wanted):
            raise ApiVersionNotServedError(wanted[0], wanted[1], self.served.as_dict())

    def report(self) -> dict[str, Any]:
        """For readiness details."""
        if not self.enabled:
            return {"status": "discovery off (upstream.api_versions_refresh_seconds: 0)"}
        return {
            "versions": self.served.as_dict() if self.served is not None else None,
            "read_at": _stamp(self.read_at),
            "error": self.error,
        }
