"""Bearer token validation: from an ``Authorization`` header to a trusted :class:`Principal`.

The order of checks is fixed and each failure has its own reason code (401 body and audit):
header shape → size → JWS structure → issuer is configured (before any network I/O) → algorithm
is on that issuer's allow-list → key for ``kid`` → signature (joserfc) → ``exp``/``nbf``/``iat``
→ ``aud`` → subject.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeGuard

from cachetools import TTLCache
from joserfc import jwt
from joserfc.errors import BadSignatureError, JoseError

from slurmproxy.entitlements import Entitlement, parse_all
from slurmproxy.errors import AuthenticationError, BadRequestError, MissingTokenError
from slurmproxy.provider import ProviderClient
from slurmproxy.settings import IssuerSettings

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_MAX_HEADER_SEGMENT = 2048
TOKEN_CACHE_SIZE = 10_000
TOKEN_CACHE_SECONDS = 300


@dataclass(frozen=True, slots=True)
class Principal:
    """A validated caller. Holds claims, never the token itself."""

    issuer: str
    subject: str
    claims: Mapping[str, Any]
    entitlements: tuple[str, ...]
    expires_at: float
    token_id: str
    parsed_entitlements: tuple[Entitlement, ...] = ()
    malformed_entitlements: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.issuer, self.subject)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def extract_bearer(values: Sequence[str], *, max_bytes: int) -> str:
    """The token from the request's Authorization header(s), or an AuthenticationError."""
    if not values:
        raise MissingTokenError()
    if len(values) > 1:
        raise BadRequestError("more than one Authorization header", reason="duplicate_authorization")
    scheme, _, token = values[0].strip().partition(" ")
    # RFC 7235 §2.1: the auth-scheme is case-insensitive.
    if scheme.lower() != "bearer":
        raise AuthenticationError("the Authorization header is not a Bearer token", reason="not_bearer")
    token = token.strip()
    if not token:
        raise MissingTokenError()
    if len(token) > max_bytes:
        raise AuthenticationError(f"the token is longer than {max_bytes} bytes", reason="token_too_large")
    if not _B64TOKEN.fullmatch(token):
        raise AuthenticationError("the token has characters a bearer token cannot have", reason="malformed_token")
    return token


def _b64json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise AuthenticationError(f"the token's {what} is not base64url JSON", reason="malformed_token") from exc
    if not isinstance(value, dict):
        raise AuthenticationError(f"the token's {what} is not a JSON object", reason="malformed_token")
    return value


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_time_claims(claims: Mapping[str, Any], now: float, leeway: int) -> None:
    exp = claims.get("exp")
    # RFC 7519 §4.1.4: the token MUST NOT be accepted on or after exp (plus a small leeway for skew).
    if not _is_number(exp):
        raise AuthenticationError("the token has no numeric exp claim", reason="missing_exp")
    if now >= exp + leeway:
        raise AuthenticationError("the token has expired", reason="token_expired")
    nbf = claims.get("nbf")
    # RFC 7519 §4.1.5: the token MUST NOT be accepted before nbf.
    if nbf is not None and (not _is_number(nbf) or now + leeway < nbf):
        raise AuthenticationError("the token is not valid yet (nbf)", reason="token_not_yet_valid")
    iat = claims.get("iat")
    # RFC 7519 §4.1.6: an iat in the future means a forged or badly clocked issuer.
    if iat is not None and (not _is_number(iat) or iat > now + leeway):
        raise AuthenticationError("the token was issued in the future (iat)", reason="token_issued_in_future")


def check_audience(claims: Mapping[str, Any], audiences: Sequence[str]) -> None:
    if not audiences:
        return
    aud = claims.get("aud")
    values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    # RFC 7519 §4.1.3: the recipient MUST identify itself with a value in aud, else reject.
    if not any(isinstance(v, str) and v in audiences for v in values):
        raise AuthenticationError("the token is not meant for this service (aud)", reason="wrong_audience")


def entitlements_from(claims: Mapping[str, Any], names: Sequence[str]) -> tuple[str, ...]:
    found: list[str] = []
    for name in names:
        value = claims.get(name)
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, list):
            found.extend(v for v in value if isinstance(v, str))
    return tuple(dict.fromkeys(found))


def make_principal(issuer: IssuerSettings, claims: Mapping[str, Any], token: str) -> Principal:
    subject = claims.get(issuer.subject_claim)
    if not isinstance(subject, str) or not subject:
        raise AuthenticationError(f"the token has no {issuer.subject_claim} claim", reason="missing_subject")
    exp = claims.get("exp")
    entitlements = entitlements_from(claims, issuer.entitlement_claims)
    parsed = parse_all(entitlements)
    return Principal(
        issuer=issuer.issuer,
        subject=subject,
        claims=MappingProxyType(dict(claims)),
        entitlements=entitlements,
        expires_at=float(exp) if _is_number(exp) else 0.0,
        token_id=token_digest(token)[:16],
        parsed_entitlements=parsed.valid,
        malformed_entitlements=parsed.malformed,
    )


class TokenValidator:
    """Validates bearer tokens from the configured issuers; caches valid ones by token hash."""

    def __init__(
        self,
        providers: Mapping[str, ProviderClient],
        *,
        max_token_bytes: int,
        clock: Callable[[], float] = time.time,
        cache_size: int = TOKEN_CACHE_SIZE,
        cache_seconds: float = TOKEN_CACHE_SECONDS,
    ) -> None:
        self._providers = dict(providers)
        self._max_token_bytes = max_token_bytes
        self._clock = clock
        self._cache: TTLCache[str, Principal] = TTLCache(maxsize=cache_size, ttl=cache_seconds, timer=clock)

    @property
    def providers(self) -> Mapping[str, ProviderClient]:
        return self._providers

    async def authenticate(self, authorization: Sequence[str]) -> Principal:
        token = extract_bearer(authorization, max_bytes=self._max_token_bytes)
        digest = token_digest(token)
        cached = self._cache.get(digest)
        now = self._clock()
        if cached is not None:
            leeway = self._providers[cached.issuer].settings.leeway_seconds
            if now < cached.expires_at + leeway:
                return cached
            self._cache.pop(digest, None)
        principal = await self.validate(token, now)
        self._cache[digest] = principal
        return principal

    async def validate(self, token: str, now: float) -> Principal:
        parts = token.split(".")
        if len(parts) != 3:
            raise AuthenticationError("the token is not a signed JWT", reason="malformed_token")
        if len(parts[0]) > _MAX_HEADER_SEGMENT:
            raise AuthenticationError("the token header is too large", reason="malformed_token")
        header = _b64json(parts[0], "header")
        unverified = _b64json(parts[1], "payload")
        # Deny by default: only configured issuers are trusted, decided before any outbound request.
        issuer = unverified.get("iss")
        provider = self._providers.get(issuer) if isinstance(issuer, str) else None
        if provider is None:
            raise AuthenticationError("the token's issuer is not trusted here", reason="untrusted_issuer")
        settings = provider.settings
        alg = header.get("alg")
        # RFC 8725 §3.1: use an allow-list of algorithms; never "none", never HMAC with a public key.
        if not isinstance(alg, str) or alg not in settings.algorithms:
            raise AuthenticationError("the token's signing algorithm is not allowed", reason="algorithm_not_allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationError("the token's key id is not a string", reason="malformed_token")
        # jku, x5u and jwk headers are ignored: keys come only from the configured issuer.
        key = await provider.key_for(kid)
        if key is None:
            raise AuthenticationError(
                "the token was signed with a key the issuer does not publish", reason="unknown_key"
            )
        try:
            decoded = jwt.decode(token, key, algorithms=[alg])
        except BadSignatureError as exc:
            raise AuthenticationError("the token's signature is invalid", reason="bad_signature") from exc
        except JoseError as exc:
            raise AuthenticationError(
                f"the token could not be verified ({exc.error})", reason="invalid_signature_input"
            ) from exc
        claims = decoded.claims
        check_time_claims(claims, now, settings.leeway_seconds)
        check_audience(claims, settings.audiences)
        return make_principal(settings, claims, token)
