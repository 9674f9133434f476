"""The bearer token in an ``Authorization`` header, and its shape: JWS (a JSON header) or opaque.

No I/O, no keys: only what can be read from the header value itself (RFC 6750, RFC 7515).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

from slurmproxy.errors import AuthenticationError, BadRequestError, MissingTokenError

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_MAX_HEADER_SEGMENT = 2048


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def extract_bearer(values: Sequence[str], *, max_bytes: int, check_syntax: bool = True) -> str:
    """The token from the request's Authorization header(s), or an AuthenticationError.

    ``check_syntax=False`` leaves the character check (the costliest part, a regex over the whole
    token) to the caller: the validator runs it only for tokens not already in its cache, since a
    cached token passed it.
    """
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
    if check_syntax:
        check_token_syntax(token)
    return token


def check_token_syntax(token: str) -> None:
    if not _B64TOKEN.fullmatch(token):
        raise AuthenticationError("the token has characters a bearer token cannot have", reason="malformed_token")


def b64json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise AuthenticationError(f"the token's {what} is not base64url JSON", reason="malformed_token") from exc
    if not isinstance(value, dict):
        raise AuthenticationError(f"the token's {what} is not a JSON object", reason="malformed_token")
    return value


def jwt_header(parts: list[str]) -> dict[str, Any] | None:
    """The JOSE header when the token is shaped like a JWS (three segments, a JSON header), else None."""
    if len(parts) != 3 or len(parts[0]) > _MAX_HEADER_SEGMENT:
        return None
    try:
        return b64json(parts[0], "header")
    except AuthenticationError:
        return None
