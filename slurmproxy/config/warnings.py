"""What a configuration allows that is legal but probably unsafe: said by ``check-config`` and logged at
start-up, never an error (the policy's own warnings come from :mod:`slurmproxy.policy.checks`)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from slurmproxy.config.settings import IdentitySettings, OidcSettings, Settings, UpstreamSettings


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _upstream(upstream: UpstreamSettings) -> list[str]:
    parts = urlsplit(upstream.url)
    if upstream.auth == "service_token" and parts.scheme == "http" and not _loopback(parts.hostname or ""):
        return [
            f"upstream.url {upstream.url} is plain http to a host that is not loopback, and upstream.auth is "
            "service_token: the SlurmUser's token (root-equivalent on the cluster) crosses the network in clear "
            "with every request; use https://, a unix: socket, or auth: mint"
        ]
    return []


def _issuers(oidc: OidcSettings) -> list[str]:
    return [
        f"oidc.issuers: {issuer.issuer} accepts tokens for any audience from any client (neither audiences nor "
        "clients is set): any relying party of this issuer that holds a user's token can replay it here; set "
        "clients (the client ids that may call this proxy: the token's azp or client_id) or audiences"
        for issuer in oidc.issuers
        if not issuer.audiences and not issuer.clients
    ]


def _identity(identity: IdentitySettings) -> list[str]:
    if identity.require_local_account:
        return []
    return [
        "identity.require_local_account is false: local accounts this host cannot look up (the cluster's "
        "slurmdbd or mysql, a uid-0 alias) are used without any uid check; name the ones you mean in "
        "identity.unknown_accounts instead"
    ]


def config_warnings(settings: Settings) -> list[str]:
    return [*_issuers(settings.oidc), *_upstream(settings.upstream), *_identity(settings.identity)]
