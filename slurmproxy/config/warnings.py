"""What a configuration allows that is legal but probably unsafe: said by ``check-config`` and logged at
start-up, never an error (the policy's own warnings come from :mod:`slurmproxy.policy.checks`)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from slurmproxy.config.settings import IdentitySettings, Settings, UpstreamSettings


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


def _identity(identity: IdentitySettings) -> list[str]:
    if identity.require_local_account:
        return []
    return [
        "identity.require_local_account is false: local accounts this host cannot look up (the cluster's "
        "slurmdbd or mysql, a uid-0 alias) are used without any uid check; name the ones you mean in "
        "identity.unknown_accounts instead"
    ]


def config_warnings(settings: Settings) -> list[str]:
    return [*_upstream(settings.upstream), *_identity(settings.identity)]
