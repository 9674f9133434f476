"""Claims about a token from its own provider: userinfo (OIDC Core §5.3) and introspection (RFC 7662).

A token is only ever sent to the provider that issued it: a JWT after its signature verified with
that issuer's keys, an opaque token only to the one issuer configured to accept opaque tokens.
Failures are the provider's (503: ``provider_unreachable``, ``provider_timeout``,
``provider_error``) unless the provider says the token itself is bad (401: ``userinfo_rejected``,
``token_inactive``). The introspection client's secret is read from a file and never logged.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

from slurmproxy.config.settings import IssuerSettings, OidcSettings
from slurmproxy.errors import AuthenticationError, ConfigError, DependencyError
from slurmproxy.tokens.checks import entitlements_from, subject_from
from slurmproxy.tokens.provider import ProviderClient, json_object, send

MAX_SECRET_BYTES = 4096
_TOKEN_REFUSED = frozenset({401, 403})  # RFC 6750 §3.1: invalid_token, insufficient_scope


def basic_auth(client_id: str, secret: str) -> str:
    """RFC 6749 §2.3.1: id and secret are form-encoded before they are joined and base64-encoded."""
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def read_client_secret(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the client secret: {exc.strerror}") from exc
    secret = raw.decode("utf-8", "replace").strip()
    if not secret or len(raw) > MAX_SECRET_BYTES or any(c.isspace() for c in secret):
        raise ConfigError(f"{path}: not a client secret (one line, at most {MAX_SECRET_BYTES} bytes)")
    return secret


def read_client_secrets(oidc: OidcSettings) -> dict[str, str]:
    """Every configured introspection secret, by issuer; a ConfigError names the first bad file."""
    return {i.issuer: read_client_secret(i.client_secret_file) for i in oidc.issuers if i.client_secret_file}


class ClaimSources:
    """The userinfo and introspection endpoints of one issuer."""

    def __init__(self, provider: ProviderClient, client_secret: str | None = None) -> None:
        self.provider = provider
        self.settings = provider.settings
        self._secret = client_secret

    def __repr__(self) -> str:
        return f"ClaimSources({self.settings.issuer!r})"

    async def userinfo(self, token: str) -> dict[str, Any]:
        url = await self.provider.endpoint("userinfo_endpoint")
        http = self.provider.http
        request = http.build_request(
            "GET", url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
        )
        response = await send(http, request, "userinfo", self.provider.timeout)
        # OIDC Core §5.3.3 / RFC 6750 §3.1: the provider refuses the token itself (expired, revoked).
        if response.status_code in _TOKEN_REFUSED:
            raise AuthenticationError(
                f"the identity provider's userinfo refused the token (HTTP {response.status_code})",
                reason="userinfo_rejected",
            )
        return json_object(response, "userinfo")

    async def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 §2: the provider's answer about an active token; 401 ``token_inactive`` otherwise."""
        if self.settings.client_id is None or self._secret is None:
            raise DependencyError("no introspection client is configured", reason="provider_error")
        url = await self.provider.endpoint("introspection_endpoint")
        http = self.provider.http
        form = {"token": token, "token_type_hint": "access_token"}
        headers = {"Accept": "application/json"}
        if self.settings.client_auth_method == "client_secret_post":
            form.update(client_id=self.settings.client_id, client_secret=self._secret)
        else:
            headers["Authorization"] = basic_auth(self.settings.client_id, self._secret)
        request = http.build_request("POST", url, data=form, headers=headers)
        response = await send(http, request, "introspection", self.provider.timeout)
        if response.status_code in {401, 403}:
            # RFC 7662 §2.3: the proxy's own client authentication failed: the site's config, not the token.
            raise DependencyError(
                f"introspection refused the proxy's client credentials (HTTP {response.status_code})",
                reason="provider_error",
            )
        answer = json_object(response, "introspection")
        # RFC 7662 §2.2: "active" is REQUIRED; anything but true means the token is not usable.
        if answer.get("active") is not True:
            raise AuthenticationError("the identity provider says the token is not active", reason="token_inactive")
        # The answer may name the issuer; it must be this one (Keycloak realms share a host).
        if "iss" in answer and answer["iss"] != self.settings.issuer:
            raise AuthenticationError("the token was issued by another issuer", reason="untrusted_issuer")
        return answer


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str
    entitlements: tuple[str, ...]
    userinfo: Mapping[str, Any] | None
    introspection: Mapping[str, Any] | None


async def resolve(
    settings: IssuerSettings,
    sources: ClaimSources,
    token: str,
    token_claims: Mapping[str, Any],
    *,
    introspection: Mapping[str, Any] | None = None,
) -> Identity:
    """Subject and entitlements from the sources the issuer's settings name (fetched concurrently)."""
    found: dict[str, Mapping[str, Any]] = {"token": token_claims}
    if introspection is not None:
        found["introspection"] = introspection
    wanted = sorted(settings.claim_sources - found.keys())
    fetchers = {"userinfo": sources.userinfo, "introspection": sources.introspect}
    answers = await asyncio.gather(*(fetchers[name](token) for name in wanted))
    found.update(zip(wanted, answers, strict=True))
    subs = {name: claims["sub"] for name, claims in found.items() if "sub" in claims}
    # OIDC Core §5.3.2: the sub in the UserInfo Response MUST exactly match the token's.
    if len(set(map(str, subs.values()))) > 1:
        raise DependencyError(
            f"the identity provider's {' and '.join(sorted(subs))} name different subjects", reason="provider_error"
        )
    subject_source = settings.subject_source or settings.entitlements_source
    subject = subject_from(found[subject_source], settings.subject_claim, subject_source)
    entitlements = entitlements_from(found[settings.entitlements_source], settings.entitlement_claims)
    userinfo = found.get("userinfo")
    introspected = found.get("introspection")
    return Identity(
        subject=subject,
        entitlements=entitlements,
        userinfo=MappingProxyType(dict(userinfo)) if userinfo is not None else None,
        introspection=MappingProxyType(dict(introspected)) if introspected is not None else None,
    )
