"""Checks on a token's claims, wherever they came from (the JWT itself, or an introspection answer),
and the readers of subject and entitlements. Pure functions: no I/O, the clock is an argument."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

from slurmproxy.errors import AuthenticationError

ACCESS_TOKEN_TYPES = frozenset({"bearer", "access_token"})


def is_number(value: Any) -> TypeGuard[int | float]:
    """A finite JSON number: Python's json reads ``NaN`` and ``Infinity``, and every comparison with NaN
    is false, so an ``exp`` of NaN would never expire and an ``nbf`` of NaN would never be in the future."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_time_claims(claims: Mapping[str, Any], now: float, leeway: int, *, require_exp: bool = True) -> None:
    exp = claims.get("exp")
    # RFC 7519 §4.1.4: the token MUST NOT be accepted on or after exp (plus a small leeway for skew).
    if exp is not None or require_exp:
        if not is_number(exp):
            raise AuthenticationError("the token has no numeric exp claim", reason="missing_exp")
        if now >= exp + leeway:
            raise AuthenticationError("the token has expired", reason="token_expired")
    nbf = claims.get("nbf")
    # RFC 7519 §4.1.5: the token MUST NOT be accepted before nbf.
    if nbf is not None and (not is_number(nbf) or now + leeway < nbf):
        raise AuthenticationError("the token is not valid yet (nbf)", reason="token_not_yet_valid")
    iat = claims.get("iat")
    # RFC 7519 §4.1.6: an iat in the future means a forged or badly clocked issuer.
    if iat is not None and (not is_number(iat) or iat > now + leeway):
        raise AuthenticationError("the token was issued in the future (iat)", reason="token_issued_in_future")


def check_jwt_subject(claims: Mapping[str, Any]) -> None:
    """RFC 9068 §2.2: a JWT access token MUST have ``sub``. Checked before any provider call, so a token
    without one is a 401 rather than, when userinfo fails, a 503."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthenticationError("the token has no sub claim", reason="missing_subject")


def check_audience(claims: Mapping[str, Any], audiences: Sequence[str]) -> None:
    if not audiences:
        return
    aud = claims.get("aud")
    values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    # RFC 7519 §4.1.3: the recipient MUST identify itself with a value in aud, else reject.
    if not any(isinstance(v, str) and v in audiences for v in values):
        raise AuthenticationError("the token is not meant for this service (aud)", reason="wrong_audience")


def check_client(claims: Mapping[str, Any], clients: Sequence[str]) -> None:
    """The client the token was issued to must be one of ``clients`` (if any are configured).

    Keycloak names it ``azp``, RFC 9068 and RFC 7662 ``client_id``; every one present must be listed, so
    two that disagree are refused.
    """
    if not clients:
        return
    named = [claims[name] for name in ("azp", "client_id") if name in claims]
    if not named or not all(isinstance(c, str) and c in clients for c in named):
        raise AuthenticationError(
            "the token was issued to a client this service does not accept (azp, client_id)", reason="wrong_client"
        )


def check_header_type(header: Mapping[str, Any], require_at_jwt: bool) -> None:
    """RFC 9068 §4: an access token's JOSE header says ``typ: at+jwt`` (RFC 7515 §4.1.9: the
    ``application/`` prefix may be left out, and media types compare case-insensitively)."""
    if not require_at_jwt:
        return
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower().removeprefix("application/") != "at+jwt":
        raise AuthenticationError("the token is not a JWT access token (typ at+jwt)", reason="wrong_token_type")


def check_bearer(claims: Mapping[str, Any]) -> None:
    # RFC 9449 §7 / RFC 8705 §3: a sender-constrained token (cnf) needs a proof the proxy does not check;
    # accepting it as a bearer token would remove the binding's protection.
    if "cnf" in claims:
        raise AuthenticationError("sender-constrained tokens (cnf) are not accepted", reason="wrong_token_type")


def check_jwt_type(claims: Mapping[str, Any], token_types: Sequence[str]) -> None:
    """Keycloak's ``typ`` claim tells access tokens (``Bearer``) from ID and refresh tokens."""
    if token_types and claims.get("typ") not in token_types:
        raise AuthenticationError("the token is not an access token (typ)", reason="wrong_token_type")


def check_introspected_type(answer: Mapping[str, Any], token_types: Sequence[str]) -> None:
    """An opaque token must be an access token: RFC 7662 ``token_type``, else Keycloak's ``typ``.

    oidc-provider omits token_type for refresh tokens, so an answer that says neither is refused.
    """
    token_type = answer.get("token_type")
    if isinstance(token_type, str):
        ok = token_type.lower() in ACCESS_TOKEN_TYPES
    else:
        typ = answer.get("typ")
        ok = isinstance(typ, str) and (typ in token_types if token_types else typ.lower() in ACCESS_TOKEN_TYPES)
    if not ok:
        raise AuthenticationError("the provider does not say this is an access token", reason="wrong_token_type")


def entitlements_from(claims: Mapping[str, Any], names: Sequence[str]) -> tuple[str, ...]:
    found: list[str] = []
    for name in names:
        value = claims.get(name)
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, list):
            found.extend(v for v in value if isinstance(v, str))
    return tuple(dict.fromkeys(found))


def subject_from(claims: Mapping[str, Any], names: Sequence[str], source: str) -> str:
    for name in names:
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value
    where = "token" if source == "token" else f"{source} answer"
    raise AuthenticationError(f"the {where} has no {' or '.join(names)} claim", reason="missing_subject")
