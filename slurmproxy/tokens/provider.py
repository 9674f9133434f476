"""What the proxy fetches from one configured OpenID provider: discovery metadata and signing keys.

Every URL fetched here derives from the configuration (the issuer URL, or explicit endpoints),
never from a token. Fetches are async, time-limited, and single-flight: concurrent callers that
need keys share one request.

Key set lifecycle:

* a key set older than ``cache_seconds`` is refreshed in the background while the current keys
  keep verifying (a stale key set never delays a request);
* an unknown ``kid`` triggers at most one refetch per ``min_refetch_seconds``, so random key ids
  cannot make the proxy hammer the provider; a key published after a rotation is found that way;
* a failed fetch keeps the cached keys (an outage does not break tokens already verifiable) and
  is not retried for ``failure_backoff_seconds``; meanwhile anything that needs the provider gets
  the same 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, OKPKey, RSAKey

from slurmproxy.config.settings import IssuerSettings, OidcSettings
from slurmproxy.errors import DependencyError

logger = logging.getLogger("slurmproxy.provider")

PublicKey = RSAKey | ECKey | OKPKey
MIN_BACKOFF_SECONDS = 1.0
MAX_DOCUMENT_BYTES = 512 * 1024
# RFC 7638 §3.2: the members that make a public key what it is (other members may change freely).
_KEY_MATERIAL = ("kty", "crv", "n", "e", "x", "y")


async def send(http: httpx.AsyncClient, request: httpx.Request, what: str, timeout: float) -> httpx.Response:
    """Send one request to a provider: transport failures become 503 DependencyErrors, bodies are bounded."""
    request.extensions["timeout"] = httpx.Timeout(timeout).as_dict()
    try:
        response = await http.send(request)
    except httpx.TimeoutException as exc:
        raise DependencyError(f"{what} at the identity provider timed out", reason="provider_timeout") from exc
    except httpx.HTTPError as exc:
        raise DependencyError(f"{what} at the identity provider is unreachable", reason="provider_unreachable") from exc
    if len(response.content) > MAX_DOCUMENT_BYTES:
        raise DependencyError(f"{what} at the identity provider is too large", reason="provider_error")
    return response


def json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code != 200:
        raise DependencyError(
            f"{what} at the identity provider answered HTTP {response.status_code}", reason="provider_error"
        )
    try:
        document = response.json()
    except ValueError as exc:
        raise DependencyError(f"{what} at the identity provider is not JSON", reason="provider_error") from exc
    if not isinstance(document, dict):
        raise DependencyError(f"{what} at the identity provider is not a JSON object", reason="provider_error")
    return document


@dataclass
class _KeyCache:
    keys: dict[str, PublicKey] = field(default_factory=dict)
    unnamed: list[PublicKey] = field(default_factory=list)
    fetched_at: float | None = None
    material: dict[str, tuple[Any, ...]] = field(default_factory=dict)


class ProviderClient:
    """Discovery metadata and the key set of one trusted issuer."""

    def __init__(
        self,
        settings: IssuerSettings,
        http: httpx.AsyncClient,
        oidc: OidcSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.http = http
        self.timeout = oidc.http_timeout_seconds
        self._cache_seconds = oidc.jwks_cache_seconds
        self._min_refetch = oidc.jwks_min_refetch_seconds
        # Even with failures not cached per token, a failing provider is not asked again at once.
        self._backoff = max(MIN_BACKOFF_SECONDS, oidc.failure_cache_seconds)
        self._clock = clock
        self._metadata: dict[str, Any] | None = None
        self._keys = _KeyCache()
        self._lock = asyncio.Lock()
        self._metadata_lock = asyncio.Lock()
        self._discovery_failure: tuple[float, DependencyError] | None = None
        self._failed_at: float | None = None
        self._failure: DependencyError | None = None
        self._background: asyncio.Task[None] | None = None

    @property
    def issuer(self) -> str:
        return self.settings.issuer

    @property
    def keys_loaded(self) -> bool:
        return self._keys.fetched_at is not None

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        request = self.http.build_request("GET", url, headers={"Accept": "application/json"})
        return json_object(await send(self.http, request, what, self.timeout), what)

    async def metadata(self) -> dict[str, Any]:
        """OIDC Discovery 1.0 §4: fetched once from the configured issuer; cached for the process.

        Single flight; after a failure, callers get the same 503 without a request for the back-off.
        """
        if self._metadata is not None:
            return self._metadata
        async with self._metadata_lock:
            if self._metadata is not None:
                return self._metadata
            failed = self._discovery_failure
            if failed is not None and self._clock() - failed[0] < self._backoff:
                raise _fresh(failed[1])
            try:
                document = await self._get_json(
                    self.issuer.rstrip("/") + "/.well-known/openid-configuration", "discovery"
                )
                # OIDC Discovery §4.3: the issuer in the document MUST be identical to the configured one.
                if document.get("issuer") != self.issuer:
                    raise DependencyError(
                        "discovery document names a different issuer than configured", reason="provider_error"
                    )
            except DependencyError as exc:
                self._discovery_failure = (self._clock(), exc)
                raise
            self._metadata, self._discovery_failure = document, None
            return document

    async def endpoint(self, name: str) -> str:
        """A configured endpoint (``jwks_uri``, ``userinfo_endpoint``, ...), else the discovery document's."""
        configured = getattr(self.settings, name, None)
        if isinstance(configured, str):
            return configured
        uri = (await self.metadata()).get(name)
        if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
            raise DependencyError(f"discovery document has no usable {name}", reason="provider_error")
        # A plain-http endpoint is only believed from a plain-http (development) issuer.
        if uri.startswith("http://") and self.issuer.startswith("https://"):
            raise DependencyError(f"discovery document's {name} is not https", reason="provider_error")
        return uri

    async def jwks_uri(self) -> str:
        return await self.endpoint("jwks_uri")

    # ------------------------------------------------------------------ key set
    def _age(self) -> float | None:
        fetched = self._keys.fetched_at
        return None if fetched is None else self._clock() - fetched

    def _stale(self) -> bool:
        age = self._age()
        return age is None or age >= self._cache_seconds

    def _backing_off(self) -> bool:
        return self._failed_at is not None and self._clock() - self._failed_at < self._backoff

    def _may_refetch(self) -> bool:
        age = self._age()
        return (age is None or age >= self._min_refetch) and not self._backing_off()

    async def refresh_keys(self, *, force: bool = False) -> None:
        """Fetch the key set unless another caller just did (single flight)."""
        async with self._lock:
            if not force and not self._stale():
                return
            await self._fetch_keys()

    async def _fetch_keys(self) -> None:
        if self._backing_off() and self._failure is not None:
            raise _fresh(self._failure)
        try:
            document = await self._get_json(await self.jwks_uri(), "key set")
            keys = _parse_jwks(document, self._clock(), self._keys)
        except DependencyError as exc:
            self._failed_at, self._failure = self._clock(), exc
            raise
        self._keys, self._failed_at, self._failure = keys, None, None
        logger.info("loaded %d signing keys for %s", len(keys.keys) + len(keys.unnamed), self.issuer)

    def refresh_soon(self) -> None:
        """If the key set is stale, refresh it in the background (never awaited by a request)."""
        if not self._stale() or self._backing_off() or self._keys.fetched_at is None:
            return
        if self._background is None or self._background.done():
            self._background = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh_keys()
        except DependencyError as exc:
            logger.warning("key set refresh for %s failed (%s); keeping the cached keys", self.issuer, exc.reason)

    async def key_for(self, kid: str | None) -> PublicKey | None:
        """The verification key for a token header's ``kid``; None when the provider has no such key."""
        if self._keys.fetched_at is None:
            await self.refresh_keys()
        else:
            self.refresh_soon()
        key = self._lookup(kid)
        if key is None and (self._may_refetch() or self._backing_off()):
            # A new kid may mean the provider rotated its keys: refetch once, rate limited. While the
            # provider is failing, the token can be neither verified nor refused: 503, not 401.
            await self._refetch_after_miss()
            key = self._lookup(kid)
        return key

    async def _refetch_after_miss(self) -> None:
        async with self._lock:
            if self._may_refetch() or self._backing_off():
                await self._fetch_keys()

    def key_is_current(self, kid: str | None, key: PublicKey) -> bool:
        """Whether ``key`` is still published under ``kid`` (a cheap check for cached tokens)."""
        return self._lookup(kid) is key

    def _lookup(self, kid: str | None) -> PublicKey | None:
        if kid is not None:
            return self._keys.keys.get(kid)
        candidates = list(self._keys.keys.values()) + self._keys.unnamed
        return candidates[0] if len(candidates) == 1 else None

    async def settle(self) -> None:
        """Wait for a background refresh in progress, if any."""
        if self._background is not None:
            await asyncio.gather(self._background, return_exceptions=True)

    async def aclose(self) -> None:
        if self._background is not None:
            self._background.cancel()
        await self.settle()


def _fresh(error: DependencyError) -> DependencyError:
    return DependencyError(error.detail, reason=error.reason)


def _parse_jwks(document: dict[str, Any], now: float, previous: _KeyCache) -> _KeyCache:
    cache = _KeyCache(fetched_at=now)
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise DependencyError("key set has no 'keys' list", reason="provider_error")
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        # Public keys only: a symmetric ("oct") entry in a provider's JWKS is never a verification key.
        if entry.get("kty") not in {"RSA", "EC", "OKP"} or "d" in entry:
            continue
        kid = entry.get("kid")
        material = tuple(entry.get(member) for member in _KEY_MATERIAL)
        if isinstance(kid, str) and previous.material.get(kid) == material:
            # The same key as before keeps its identity, so cached tokens verified with it stay valid.
            cache.keys[kid], cache.material[kid] = previous.keys[kid], material
            continue
        try:
            key = JWKRegistry.import_key(entry)
        except (JoseError, ValueError, TypeError):
            logger.warning("ignoring an unusable key in the key set (kid=%r)", entry.get("kid"))
            continue
        if not isinstance(key, RSAKey | ECKey | OKPKey):  # pragma: no cover - kty filtered above
            continue
        if isinstance(kid, str):
            cache.keys[kid], cache.material[kid] = key, material
        else:
            cache.unnamed.append(key)
    return cache
