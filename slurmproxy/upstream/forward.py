"""The upstream stage's entry point: a local account and a request in, slurmrestd's answer out.

:class:`Upstream` holds everything that talks to slurmrestd: the pooled client, the Slurm credential
for each account, the API versions slurmrestd serves, the check that tells Slurm's rejection of the
proxy's own credential apart from the job's errors, and the polling shield. The pipeline asks it
whether a path's API version is served (:meth:`Upstream.check_served`) and forwards with
:meth:`Upstream.forward`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from slurmproxy.config.settings import Settings
from slurmproxy.core.slurmrest import OPENAPI_DOCUMENT
from slurmproxy.errors import ProxyError
from slurmproxy.observability.metrics import Metrics
from slurmproxy.upstream.apiversions import ApiVersions
from slurmproxy.upstream.authcheck import UpstreamAuthCheck
from slurmproxy.upstream.credentials import credentials_from
from slurmproxy.upstream.exchange import UpstreamResponse, create_client, send
from slurmproxy.upstream.headers import client_headers, normalized
from slurmproxy.upstream.shield import SharedCache, Shield, ShieldResult, variant

READINESS_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A request to forward: the canonical path, the client's headers (the header policy is applied here),
    the body (bytes, streamed, or None) and the Content-Length to send with it; ``content_type``, when
    set, replaces the client's (job bodies: the proxy checked JSON, so it says JSON); ``owner``, when
    set, counts against ``upstream.max_connections_per_identity``."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes | AsyncIterator[bytes] | None
    length: str | None
    request_id: str
    content_type: str | None = None
    owner: str | None = None  # the identity whose share of slurmrestd's connections this request takes


class Upstream:
    def __init__(self, settings: Settings, metrics: Metrics, *, shared_cache: SharedCache | None = None) -> None:
        self.pool = create_client(settings.upstream)
        self.credentials = credentials_from(settings.upstream)
        self.apis = ApiVersions(self.pool, self.credentials, settings.upstream)
        self.auth_check = UpstreamAuthCheck(self.pool)
        self.shield = Shield(settings.shield, shared=shared_cache)  # shared_cache: the replicas' tier, if any
        self._metrics = metrics
        self._request_id_header = settings.server.request_id_header.lower().encode()

    def start(self) -> None:
        """Start reading slurmrestd's API versions in the background (then every refresh interval)."""
        self.apis.start()

    async def aclose(self) -> None:
        await self.apis.aclose()
        await self.pool.aclose()

    @property
    def api_versions(self) -> tuple[str, ...]:
        """The API versions slurmrestd serves (``("v0.0.40", "v0.0.41", "v0.0.42")``); empty until known."""
        return self.apis.versions

    async def check_served(self, path: str) -> None:
        """404 ``api_version_not_served`` for a path whose API version slurmrestd does not serve."""
        await self.apis.check(path)

    async def forward(self, request: Outgoing, account: str) -> ShieldResult:
        """slurmrestd's answer for ``account``: its own, one shared with identical concurrent requests, or a
        cached one. Raises UpstreamError/UpstreamTimeoutError, or UpstreamAuthFailed (502) when Slurm
        rejected the proxy's credential."""
        rid = self._request_id_header
        forwarded = [(k, v) for k, v in client_headers(request.headers) if normalized(k) != rid]
        if request.content_type is not None:
            forwarded = [(k, v) for k, v in forwarded if normalized(k) != b"content-type"]
            forwarded.append((b"content-type", request.content_type.encode("ascii")))
        credential = self.credentials.headers_for(account)
        headers = [*forwarded, *credential, (rid, request.request_id.encode())]
        if request.length is not None:
            headers.append((b"content-length", request.length.encode()))

        async def exchange() -> UpstreamResponse:
            response = await send(
                self.pool,
                method=request.method,
                path=request.path,
                query=request.query,
                headers=headers,
                content=request.body,
                owner=request.owner,
            )
            try:
                await self.auth_check.check(response, path=request.path, user=account, headers=credential)
            except ProxyError as error:  # slurmrestd answered: the record keeps its status
                error.upstream_status = error.upstream_status or response.status_code
                raise
            return response

        if request.body is None and self.shield.applies(request.method, request.path):
            key = (account, request.method, request.path, request.query, variant(forwarded))
            result = await self.shield.fetch(key, exchange)
            self._metrics.cache_lookup("shield", result.source != "upstream")
            return result
        return ShieldResult("upstream", stream=await exchange())

    async def answers(self) -> tuple[bool, str]:
        """For readiness: whether slurmrestd answers at all (its OpenAPI document, without credentials)."""
        headers = [(b"x-request-id", b"readiness")]
        try:
            response = await send(
                self.pool,
                method="GET",
                path=OPENAPI_DOCUMENT,
                query=b"",
                headers=headers,
                content=None,
                timeout=READINESS_TIMEOUT_SECONDS,
            )
        except ProxyError as exc:
            return False, f"slurmrestd unreachable ({exc.reason})"
        await response.aclose()
        return True, f"slurmrestd answered HTTP {response.status_code}"

    def report(self) -> dict[str, Any]:
        """For readiness details: the API versions served and Slurm's rejections of the proxy's credential."""
        return {"api_versions": self.apis.report(), "upstream_credential": self.auth_check.report()}
