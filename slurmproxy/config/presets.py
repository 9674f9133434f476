"""Issuer presets: a known provider's settings selected with one line (``- preset: egi-checkin``).

A preset only supplies defaults: any setting written next to it overrides the preset's value.

EGI Check-in (Keycloak since 2022; https://docs.egi.eu/providers/check-in/sp/): access tokens are RS256
JWTs with ``typ: Bearer`` and neither ``aud`` nor entitlements; ``eduperson_entitlement`` and
``voperson_id`` are released only at userinfo and introspection. So the presets read both from
userinfo, take the subject from ``voperson_id`` (the Community User Identifier that replaces
``sub``) and fall back to ``sub`` when the token's scopes did not release it.

Without ``aud``, a Check-in token does not say which service it is for: a preset cannot know the
site's clients, so the replay-safe setting is written next to it, ``clients: [...]`` (the ``azp`` of
the tools meant to call the proxy); ``check-config`` warns while neither ``clients`` nor
``audiences`` is set.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

PresetName = Literal["egi-checkin", "egi-checkin-demo", "egi-checkin-dev"]

CHECKIN_ISSUERS: Mapping[str, str] = {
    "egi-checkin": "https://aai.egi.eu/auth/realms/egi",
    "egi-checkin-demo": "https://aai-demo.egi.eu/auth/realms/egi",
    "egi-checkin-dev": "https://aai-dev.egi.eu/auth/realms/egi",
}

# The MITREid issuers (https://aai*.egi.eu/oidc/) were switched off in 2022.
_LEGACY_CHECKIN = re.compile(r"https?://aai(?:-demo|-dev)?\.egi\.eu/oidc(?:/.*)?", re.IGNORECASE)


def _checkin(issuer: str) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "algorithms": ["RS256"],
        "token_types": ["Bearer"],  # Keycloak's typ claim: refuses ID and refresh tokens
        "entitlements_source": "userinfo",
        "subject_source": "userinfo",
        "subject_claim": ["voperson_id", "sub"],
        "entitlement_claims": ["eduperson_entitlement", "entitlements"],
    }


PRESETS: Mapping[str, Mapping[str, Any]] = {name: _checkin(url) for name, url in CHECKIN_ISSUERS.items()}


def with_preset(data: Mapping[str, Any]) -> dict[str, Any]:
    """The issuer entry with its preset's defaults filled in (explicit keys win)."""
    name = data.get("preset")
    if name is None or name not in PRESETS:
        return dict(data)  # an unknown name is reported by the preset field's own validation
    return {**PRESETS[name], **data}


def legacy_checkin_issuer(issuer: str) -> bool:
    return _LEGACY_CHECKIN.fullmatch(issuer) is not None
