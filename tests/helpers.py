"""Shared test helpers: signing keys, token factory, settings and policy builders."""

from __future__ import annotations

import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey

from slurmproxy.config.settings import Settings, load_settings
from slurmproxy.core.entitlements import parse_all
from slurmproxy.core.principal import Principal

ISSUER = "https://idp.example.org/realms/test"
OTHER_ISSUER = "https://other.example.org"
AUDIENCE = "slurm-proxy"
VO_MEMBER = "urn:mace:egi.eu:group:vo.example.org:role=member#aai.egi.eu"
OTHER_VO = "urn:mace:egi.eu:group:vo.other.org:role=member#aai.egi.eu"
JWKS_URI = f"{ISSUER}/protocol/openid-connect/certs"
UPSTREAM = "http://slurmrestd.test:6820"
# Set by the `upstream` fixture: where the stand-in slurmrestd listens (answers are registered under UPSTREAM).
upstream_url: str | None = None


class Signer:
    """An issuer's signing keys and a factory for tokens signed by them."""

    def __init__(self, issuer: str = ISSUER, kid: str = "key-1") -> None:
        self.issuer = issuer
        self.key = RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"}, private=True)
        self.kid = kid

    def jwks(self, *extra: RSAKey | ECKey) -> dict[str, Any]:
        keys = [self.key, *extra]
        return {"keys": [k.as_dict(private=False) for k in keys]}

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": "alice@example.org",
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 600,
            "eduperson_entitlement": [VO_MEMBER],
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self, header: dict[str, Any] | None = None, key: RSAKey | ECKey | OctKey | None = None, **claims: Any
    ) -> str:
        hdr = {"alg": "RS256", "kid": self.kid, "typ": "at+jwt"}
        hdr.update(header or {})
        hdr = {k: v for k, v in hdr.items() if v is not None}
        return jwt.encode(hdr, self.claims(**claims), key or self.key, algorithms=[hdr["alg"]])


def discovery(issuer: str = ISSUER) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "jwks_uri": f"{issuer}/protocol/openid-connect/certs",
        "token_endpoint": f"{issuer}/protocol/openid-connect/token",
    }


def write_policy(directory: Path, policy: dict[str, Any], name: str = "policy.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return directory


def basic_policy(**rule_overrides: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "id": "members",
        "entitlements": [VO_MEMBER],
        "allow": ["ping", "read-only", "submit", "cancel-own"],
        "mapping": [{"table": "users"}, {"service_account": "svc-alpha"}],
    }
    rule.update(rule_overrides)
    return {
        "rules": [rule],
        "tables": {"users": {"entries": [{"issuer": ISSUER, "subject": "alice@example.org", "user": "alice"}]}},
    }


def make_settings(tmp_path: Path, policy: dict[str, Any] | None = None, **sections: Any) -> Settings:
    key = tmp_path / "jwt_hs256.key"
    if not key.exists():
        key.write_bytes(b"k" * 32)
    policy_dir = write_policy(tmp_path / "policies", policy or basic_policy())
    data: dict[str, Any] = {
        "oidc": {"issuers": [{"issuer": ISSUER, "audiences": [AUDIENCE]}]},
        # API-version discovery off: unit tests answer only the requests they expect (tests/test_apiversions.py).
        "upstream": {
            "url": upstream_url or UPSTREAM,
            "auth": "mint",
            "jwt_key_file": str(key),
            "api_versions_refresh_seconds": 0,
        },
        "policy": {"paths": [str(policy_dir)]},
        "audit": {"sink": "file", "file": str(tmp_path / "audit.log")},
        "identity": {"min_uid": 1000},
    }
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    return load_settings(config)


def principal(
    *entitlements: str, issuer: str = ISSUER, subject: str = "alice@example.org", claims: dict[str, Any] | None = None
) -> Principal:
    parsed = parse_all(entitlements)
    return Principal(
        issuer=issuer,
        subject=subject,
        claims=MappingProxyType(claims or {}),
        entitlements=tuple(entitlements),
        expires_at=0.0,
        token_id="t",
        parsed_entitlements=parsed.valid,
        malformed_entitlements=parsed.malformed,
    )


def serve_keys(httpx_mock: Any, signer: Signer, *, jwks_status: int = 200) -> Signer:
    """Let pytest-httpx answer the test issuer's discovery and key set (reusable, optional)."""
    httpx_mock.add_response(
        url=f"{ISSUER}/.well-known/openid-configuration", json=discovery(), is_reusable=True, is_optional=True
    )
    if jwks_status == 200:
        httpx_mock.add_response(url=JWKS_URI, json=signer.jwks(), is_reusable=True, is_optional=True)
    else:
        httpx_mock.add_response(url=JWKS_URI, status_code=jwks_status, is_reusable=True)
    return signer
