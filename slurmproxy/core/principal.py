"""The caller as every stage after token validation sees them: issuer, subject, claims and entitlements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slurmproxy.core.entitlements import Entitlement


@dataclass(frozen=True, slots=True)
class Principal:
    """A validated caller. Holds claims, never the token itself (``token_id`` is a prefix of its hash)."""

    issuer: str
    subject: str
    claims: Mapping[str, Any]
    entitlements: tuple[str, ...]
    expires_at: float
    token_id: str
    parsed_entitlements: tuple[Entitlement, ...] = ()
    malformed_entitlements: int = 0
    userinfo: Mapping[str, Any] | None = None
    introspection: Mapping[str, Any] | None = None

    @property
    def key(self) -> tuple[str, str]:
        """The identity: the same subject from two issuers is two people."""
        return (self.issuer, self.subject)

    @property
    def vos(self) -> list[str]:
        """The VOs (groups of AARC entitlements) the caller holds, sorted."""
        return sorted({e.group for e in self.parsed_entitlements})
