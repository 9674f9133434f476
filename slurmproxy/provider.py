"""What the proxy fetches from one configured OpenID provider: discovery metadata and signing keys.

Every URL fetched here derives from the configuration (the issuer URL, or an explicit jwks_uri),
never from a token. Fetches are async, time-limited, and single-flight: concurrent callers that
need keys share one request. An unknown ``kid`` triggers at most one refetch per
``min_refetch_seconds``, so random key ids cannot make the proxy hammer the provider.
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

from slurmproxy.errors import DependencyError
from slurmproxy.settings import IssuerSettings

logger = logging.getLogger("slurmproxy.provider")

PublicKey = RSAKey | ECKey | OKPKey
DEFAULT_MIN_REFETCH_SECONDS = 60.0
MAX_DOCUMENT_BYTES = 512 * 1024


@dataclass
class _KeyCache:
    keys: dict[str, PublicKey] = field(default_factory=dict)
    unnamed: list[PublicKey] = field(default_factory=list)
    fetched_at: float | None = None


class ProviderClient:
    """Discovery metadata and the key set of one trusted issuer."""

    def __init__(
        self,
        settings: IssuerSettings,
        http: httpx.AsyncClient,
        *,
        timeout: float,
        cache_seconds: float,
        min_refetch_seconds: float = DEFAULT_MIN_REFETCH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._http = http
        self._timeout = timeout
        self._cache_seconds = cache_seconds
        self._min_refetch = min_refetch_seconds
        self._clock = clock
        self._metadata: dict[str, Any] | None = None
        self._keys = _KeyCache()
        self._lock = asyncio.Lock()
        self.fetch_count = 0

    @property
    def issuer(self) -> str:
        return self.settings.issuer

    @property
    def keys_loaded(self) -> bool:
        return self._keys.fetched_at is not None

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        self.fetch_count += 1
        try:
            response = await self._http.get(url, timeout=self._timeout, headers={"Accept": "application/json"})
        except httpx.TimeoutException as exc:
            raise DependencyError(f"{what} at the identity provider timed out", reason="provider_timeout") from exc
        except httpx.HTTPError as exc:
            raise DependencyError(
                f"{what} at the identity provider is unreachable", reason="provider_unreachable"
            ) from exc
        if response.status_code != 200:
            raise DependencyError(
                f"{what} at the identity provider answered HTTP {response.status_code}", reason="provider_error"
            )
        if len(response.content) > MAX_DOCUMENT_BYTES:
            raise DependencyError(f"{what} at the identity provider is too large", reason="provider_error")
        try:
            document = response.json()
        except ValueError as exc:
            raise DependencyError(f"{what} at the identity provider is not JSON", reason="provider_error") from exc
        if not isinstance(document, dict):
            raise DependencyError(f"{what} at the identity provider is not a JSON object", reason="provider_error")
        return document

    async def metadata(self) -> dict[str, Any]:
        """OIDC Discovery 1.0 §4: fetched once from the configured issuer; cached for the process."""
        if self._metadata is None:
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            document = await self._get_json(url, "discovery")
            # OIDC Discovery §4.3: the issuer in the document MUST be identical to the configured one.
            if document.get("issuer") != self.issuer:
                raise DependencyError(
                    "discovery document names a different issuer than configured", reason="provider_error"
                )
            self._metadata = document
        return self._metadata

    async def jwks_uri(self) -> str:
        if self.settings.jwks_uri:
            return self.settings.jwks_uri
        uri = (await self.metadata()).get("jwks_uri")
        if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
            raise DependencyError("discovery document has no usable jwks_uri", reason="provider_error")
        return uri

    def _stale(self) -> bool:
        fetched = self._keys.fetched_at
        return fetched is None or self._clock() - fetched >= self._cache_seconds

    def _may_refetch(self) -> bool:
        fetched = self._keys.fetched_at
        return fetched is None or self._clock() - fetched >= self._min_refetch

    async def refresh_keys(self, *, force: bool = False) -> None:
        """Fetch the key set unless another caller just did (single flight)."""
        async with self._lock:
            if not force and not self._stale():
                return
            document = await self._get_json(await self.jwks_uri(), "key set")
            self._keys = _parse_jwks(document, self._clock())
            logger.info("loaded %d signing keys for %s", len(self._keys.keys) + len(self._keys.unnamed), self.issuer)

    async def key_for(self, kid: str | None) -> PublicKey | None:
        """The verification key for a token header's ``kid``; None when the provider has no such key."""
        if self._stale():
            try:
                await self.refresh_keys()
            except DependencyError:
                if self._keys.fetched_at is None:
                    raise
                logger.warning("key set refresh for %s failed; keeping the cached keys", self.issuer)
        key = self._lookup(kid)
        if key is None and self._may_refetch():
            # A new kid may mean the provider rotated its keys: refetch once, rate limited.
            await self._refetch_after_miss()
            key = self._lookup(kid)
        return key

    async def _refetch_after_miss(self) -> None:
        async with self._lock:
            if not self._may_refetch():
                return
            document = await self._get_json(await self.jwks_uri(), "key set")
            self._keys = _parse_jwks(document, self._clock())

    def _lookup(self, kid: str | None) -> PublicKey | None:
        if kid is not None:
            return self._keys.keys.get(kid)
        candidates = list(self._keys.keys.values()) + self._keys.unnamed
        return candidates[0] if len(candidates) == 1 else None


def _parse_jwks(document: dict[str, Any], now: float) -> _KeyCache:
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
        try:
            key = JWKRegistry.import_key(entry)
        except (JoseError, ValueError, TypeError):
            logger.warning("ignoring an unusable key in the key set (kid=%r)", entry.get("kid"))
            continue
        if not isinstance(key, RSAKey | ECKey | OKPKey):  # pragma: no cover - kty filtered above
            continue
        kid = entry.get("kid")
        if isinstance(kid, str):
            cache.keys[kid] = key
        else:
            cache.unnamed.append(key)
    return cache
