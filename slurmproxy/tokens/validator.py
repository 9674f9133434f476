"""Bearer token validation: from an ``Authorization`` header to a trusted :class:`Principal`.

The order of checks is fixed and each failure has its own reason code (401 body and audit):
header shape → size → cache → JWS structure → issuer is configured (before any network I/O) →
algorithm is on that issuer's allow-list → header ``typ`` (``require_at_jwt``) → key for ``kid`` →
signature (joserfc) → ``exp``/``nbf``/``iat`` (finite numbers) → ``aud`` → client (``azp``,
``client_id``) → ``typ`` claim → ``sub`` (RFC 9068) → then, only for a
verified token, the issuer's userinfo or introspection if the issuer's settings read subject or
entitlements there.

A token that is not shaped like a JWT is opaque: it goes to the introspection endpoint of the one
issuer configured with ``accept_opaque_tokens`` (never to any other), or is refused.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import httpx
from joserfc import jwt
from joserfc.errors import BadSignatureError, JoseError

from slurmproxy.config.settings import IssuerSettings, OidcSettings, Settings
from slurmproxy.core.entitlements import parse_all
from slurmproxy.core.flight import SingleFlightCache
from slurmproxy.core.principal import Principal
from slurmproxy.errors import AuthenticationError, ProxyError
from slurmproxy.tokens.bearer import b64json, check_token_syntax, extract_bearer, jwt_header, token_digest
from slurmproxy.tokens.budget import IntrospectionBudget, Ticket
from slurmproxy.tokens.checks import (
    check_audience,
    check_bearer,
    check_client,
    check_header_type,
    check_introspected_type,
    check_jwt_subject,
    check_jwt_type,
    check_time_claims,
    is_number,
)
from slurmproxy.tokens.claims import ClaimSources, Identity, read_client_secrets, resolve
from slurmproxy.tokens.provider import ProviderClient, PublicKey

if TYPE_CHECKING:
    from slurmproxy.observability.metrics import Metrics

__all__ = ["TokenValidator", "build_validator", "make_principal"]

# What an opaque token of an unknown format may look like: enough characters to be unguessable, not
# absurdly many, and not a JWT whose header could not be read (``eyJ`` is base64url for ``{"``, and
# a JWS has dots; a random opaque token may start with ``eyJ`` but then has no dot in its first part).
_PLAUSIBLE_OPAQUE = re.compile(r"(?!eyJ[^.]*\.)[A-Za-z0-9\-._~+/]{16,4096}=*")


def make_principal(settings: IssuerSettings, claims: Mapping[str, Any], identity: Identity, token: str) -> Principal:
    exp = claims.get("exp")
    parsed = parse_all(identity.entitlements)
    return Principal(
        issuer=settings.issuer,
        subject=identity.subject,
        claims=MappingProxyType(dict(claims)),
        entitlements=identity.entitlements,
        expires_at=float(exp) if is_number(exp) else 0.0,
        token_id=token_digest(token)[:16],
        parsed_entitlements=parsed.valid,
        malformed_entitlements=parsed.malformed,
        userinfo=identity.userinfo,
        introspection=identity.introspection,
    )


@dataclass(frozen=True, slots=True)
class _Validated:
    """A cache entry: the principal, and the key that verified it (re-checked on every hit)."""

    principal: Principal
    provider: ProviderClient
    kid: str | None = None
    key: PublicKey | None = None


@dataclass(frozen=True, slots=True)
class _Shape:
    """A token's issuer and JOSE header as far as they can be checked before any I/O (alg None: opaque)."""

    provider: ProviderClient
    alg: str | None = None
    kid: str | None = None


class TokenValidator:
    """Validates bearer tokens from the configured issuers, with their userinfo/introspection claims.

    Results (and, briefly, refusals and provider failures) are cached under the token's SHA-256 until
    the token expires or ``cache_seconds`` pass, whichever is first; concurrent first requests with
    the same token share one validation (single flight).
    """

    def __init__(
        self,
        providers: Mapping[str, ProviderClient],
        oidc: OidcSettings,
        *,
        max_token_bytes: int,
        clock: Callable[[], float] = time.time,
        client_secrets: Mapping[str, str] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        secrets = client_secrets or {}
        self._providers = dict(providers)
        self._sources = {issuer: ClaimSources(p, secrets.get(issuer)) for issuer, p in self._providers.items()}
        # Opaque tokens name no issuer: only the one issuer configured for them ever sees one.
        self._opaque = next((s for s in self._sources.values() if s.settings.accept_opaque_tokens), None)
        pattern = self._opaque.settings.opaque_token_pattern if self._opaque is not None else None
        self._opaque_shape = re.compile(pattern) if pattern is not None else _PLAUSIBLE_OPAQUE
        self._budget = IntrospectionBudget(
            concurrency=oidc.introspection_concurrency,
            per_second=oidc.introspection_per_second,
            burst=oidc.introspection_burst,
            per_client_per_second=oidc.introspection_per_client_per_second,
            per_client_burst=oidc.introspection_per_client_burst,
            clock=clock,
            refused=metrics.introspection_refused if metrics is not None else None,
        )
        self._max_token_bytes = max_token_bytes
        self._clock = clock
        self._cache_seconds = oidc.token_cache_seconds
        self._cache: SingleFlightCache[str, _Validated] = SingleFlightCache(
            oidc.token_cache_size, failure_seconds=oidc.failure_cache_seconds, clock=clock
        )

    @property
    def providers(self) -> Mapping[str, ProviderClient]:
        return self._providers

    @property
    def sources(self) -> Mapping[str, ClaimSources]:
        return self._sources

    async def authenticate(self, authorization: Sequence[str], client: str | None = None) -> Principal:
        """The caller of the request with these Authorization headers; ``client`` (the client's address)
        is charged for introspecting an opaque token not seen before (see :mod:`slurmproxy.tokens.budget`)."""
        token = extract_bearer(authorization, max_bytes=self._max_token_bytes, check_syntax=False)
        digest = token_digest(token)
        try:
            hit = self._cache.get(digest)  # may raise a refusal or provider failure cached for this token
        except ProxyError:
            self._count_lookup(hit=True)
            raise
        if hit is not None:
            if hit.key is None:
                self._count_lookup(hit=True)
                return hit.principal
            if hit.provider.key_is_current(hit.kid, hit.key):
                hit.provider.refresh_soon()
                self._count_lookup(hit=True)
                return hit.principal
            self._cache.discard(digest)  # the provider no longer publishes the key: verify again
        self._count_lookup(hit=False)
        check_token_syntax(token)
        shape = self._shape(token)  # checks that need no I/O come first, outside the cache
        if shape.alg is None and not self._cache.computing(digest):
            # A new opaque token costs an introspection: within the budget, refused (and not remembered) beyond.
            ticket = self._budget.admit(client)
            validated = await self._cache.compute(digest, lambda: self._introspected(token, shape, ticket))
        else:
            validated = await self._cache.compute(digest, lambda: self._validate(token, shape))
        return validated.principal

    async def _introspected(self, token: str, shape: _Shape, ticket: Ticket) -> tuple[_Validated, float]:
        try:
            return await self._validate(token, shape)
        finally:
            ticket.release()

    def _count_lookup(self, *, hit: bool) -> None:
        if self._metrics is not None:
            self._metrics.cache_lookup("token", hit=hit)

    async def validate(self, token: str, now: float | None = None) -> Principal:
        """Validate without the cache."""
        check_token_syntax(token)
        validated, _ = await self._validate(token, self._shape(token), now)
        return validated.principal

    def _shape(self, token: str) -> _Shape:
        """Which issuer may look at this token, and how: decided without I/O (deny by default)."""
        parts = token.split(".")
        header = jwt_header(parts)
        if header is None:
            if self._opaque is None:
                raise AuthenticationError(
                    "the token is not a JWT, and no issuer here accepts opaque tokens", reason="malformed_token"
                )
            if not self._opaque_shape.fullmatch(token):
                raise AuthenticationError(
                    "the token is neither a JWT nor shaped like this issuer's opaque tokens", reason="malformed_token"
                )
            return _Shape(self._opaque.provider)
        unverified = b64json(parts[1], "payload")
        # Deny by default: only configured issuers are trusted, decided before any outbound request.
        issuer = unverified.get("iss")
        provider = self._providers.get(issuer) if isinstance(issuer, str) else None
        if provider is None:
            raise AuthenticationError("the token's issuer is not trusted here", reason="untrusted_issuer")
        alg = header.get("alg")
        # RFC 8725 §3.1: use an allow-list of algorithms; never "none", never HMAC with a public key.
        if not isinstance(alg, str) or alg not in provider.settings.algorithms:
            raise AuthenticationError("the token's signing algorithm is not allowed", reason="algorithm_not_allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationError("the token's key id is not a string", reason="malformed_token")
        check_header_type(header, provider.settings.require_at_jwt)
        return _Shape(provider, alg, kid)

    async def _validate(self, token: str, shape: _Shape, now: float | None = None) -> tuple[_Validated, float]:
        now = self._clock() if now is None else now
        if shape.alg is None:
            validated = await self._validate_opaque(token, shape.provider, now)
        else:
            validated = await self._validate_jwt(token, shape, now)
        principal = validated.principal
        exp = principal.claims.get("exp")
        expires_at = now + self._cache_seconds
        if is_number(exp):
            expires_at = min(expires_at, exp + shape.provider.settings.leeway_seconds)
        return validated, expires_at

    async def _validate_opaque(self, token: str, provider: ProviderClient, now: float) -> _Validated:
        settings = provider.settings
        sources = self._sources[settings.issuer]
        answer = await sources.introspect(token)
        check_introspected_type(answer, settings.token_types)
        check_bearer(answer)
        check_time_claims(answer, now, settings.leeway_seconds, require_exp=False)
        check_audience(answer, settings.audiences)
        check_client(answer, settings.clients)
        identity = await resolve(settings, sources, token, answer, introspection=answer)
        return _Validated(make_principal(settings, answer, identity, token), provider)

    async def _validate_jwt(self, token: str, shape: _Shape, now: float) -> _Validated:
        provider, settings = shape.provider, shape.provider.settings
        # jku, x5u and jwk headers are ignored: keys come only from the configured issuer.
        key = await provider.key_for(shape.kid)
        if key is None:
            raise AuthenticationError(
                "the token was signed with a key the issuer does not publish", reason="unknown_key"
            )
        try:
            decoded = jwt.decode(token, key, algorithms=[shape.alg or ""])
        except BadSignatureError as exc:
            raise AuthenticationError("the token's signature is invalid", reason="bad_signature") from exc
        except JoseError as exc:
            raise AuthenticationError(
                f"the token could not be verified ({exc.error})", reason="invalid_signature_input"
            ) from exc
        claims = decoded.claims
        check_time_claims(claims, now, settings.leeway_seconds)
        check_audience(claims, settings.audiences)
        check_client(claims, settings.clients)
        check_jwt_type(claims, settings.token_types)
        check_bearer(claims)
        check_jwt_subject(claims)
        # Only now, with the signature verified, may the token go to its own issuer's endpoints.
        identity = await resolve(settings, self._sources[settings.issuer], token, claims)
        return _Validated(make_principal(settings, claims, identity, token), provider, shape.kid, key)

    async def aclose(self) -> None:
        await self._cache.aclose()
        for provider in self._providers.values():
            await provider.aclose()


def build_validator(settings: Settings, http: httpx.AsyncClient, metrics: Metrics | None = None) -> TokenValidator:
    """The validator for a running proxy: one provider client per configured issuer, shared ``http``."""
    oidc = settings.oidc
    providers = {i.issuer: ProviderClient(i, http, oidc) for i in oidc.issuers}
    return TokenValidator(
        providers,
        oidc,
        max_token_bytes=settings.server.max_token_bytes,
        client_secrets=read_client_secrets(oidc),
        metrics=metrics,
    )
