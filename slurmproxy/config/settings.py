"""Process configuration: one YAML file, overridable by ``SLURMPROXY_*`` environment variables.

Precedence (highest first): environment variables (``SLURMPROXY_UPSTREAM__URL``, nested with
``__``), then the YAML file given to ``slurmproxy serve --config FILE``, then the defaults below.
Relative paths in the file are resolved against the file's directory. Secrets are never values
here: only paths to files that hold them (``*_file``).

Each default is stated once, on its field; the README's settings table is generated from these
fields (:mod:`slurmproxy.config.reference`), ``shown`` being how a default reads there when the
bare value would not say it well (``1 MiB`` rather than ``1048576``).
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from slurmproxy.config.presets import PresetName, legacy_checkin_issuer, with_preset
from slurmproxy.core.names import USER_NAME_PATTERN, is_user_name
from slurmproxy.core.slurmrest import compile_path, is_reserved
from slurmproxy.errors import ConfigError

ClaimSource = Literal["token", "userinfo", "introspection"]
MIN_API_VERSIONS_REFRESH_SECONDS = 10
MAX_POOL_ACCOUNTS = 100_000
MIN_LEASE_IDLE_EXPIRY_SECONDS = 600
MiB = 1024 * 1024

# Asymmetric JWS algorithms only (RFC 7518 §3.1). "none" and the HMAC family can never be allowed for
# an identity provider: an HS256 token "signed" with the provider's public key must not validate.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519"}
)

_base_dir: contextvars.ContextVar[Path | None] = contextvars.ContextVar("slurmproxy_config_dir", default=None)
_yaml_data: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("slurmproxy_yaml", default=None)


def setting(default: Any = ..., description: str = "", *, shown: str | None = None, **kwargs: Any) -> Any:
    """A field with its one default; ``shown`` is how the README table writes that default."""
    extra: JsonDict | None = {"shown": shown} if shown is not None else None
    if "default_factory" in kwargs:
        return Field(description=description, json_schema_extra=extra, **kwargs)
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


CREDENTIALS_PREFIXES = ("$CREDENTIALS_DIRECTORY/", "${CREDENTIALS_DIRECTORY}/")


def _names_credential(path: Path | str) -> bool:
    return str(path).startswith(CREDENTIALS_PREFIXES)


def _resolve(path: Path) -> Path:
    if _names_credential(path):  # $CREDENTIALS_DIRECTORY not set: kept as written (see unresolved_credentials)
        return path
    path = path.expanduser()
    return path if path.is_absolute() else ((_base_dir.get() or Path.cwd()) / path)


def _credential(value: Any) -> Any:
    """``$CREDENTIALS_DIRECTORY/NAME``: a file systemd passed with ``LoadCredential=`` (the directory is
    private to the service and exists only while it runs, so the unit cannot name it in advance).

    Without the variable (an admin's ``slurmproxy audit --config ...`` outside the service) the path
    stays as written: commands that do not read the file work, and ``serve``/``check-config`` refuse
    it with :func:`unresolved_credentials`."""
    if not isinstance(value, str) or not _names_credential(value):
        return value
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return value
    return str(Path(directory) / value.split("/", 1)[1])


def unresolved_credentials(model: BaseModel, prefix: str = "") -> list[str]:
    """The settings (``section.key``) that name ``$CREDENTIALS_DIRECTORY`` while it is not set."""
    found: list[str] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{field.alias or name}"
        values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else (value,)
        for item in values:
            if isinstance(item, BaseModel):
                found += unresolved_credentials(item, f"{key}.")
            elif isinstance(item, Path) and _names_credential(item):
                found.append(key)
    return found


ConfigPath = Annotated[Path, BeforeValidator(_credential), AfterValidator(_resolve)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Section):
    cert_file: ConfigPath = setting(
        description="the server certificate (PEM), followed by its intermediate certificates; re-read when it "
        "changes, without dropping connections ([docs/operations.md](docs/operations.md#tls))",
        shown="(required)",
    )
    key_file: ConfigPath = setting(
        description="its private key (PEM, unencrypted; e.g. `$CREDENTIALS_DIRECTORY/tls.key`)", shown="(required)"
    )
    client_ca_file: ConfigPath | None = setting(
        None,
        "if set, callers must present a client certificate signed by one of these CAs (PEM), for a trusted caller "
        "such as an interLink edge; the bearer token is still required",
        shown="none",
    )
    min_version: Literal["TLSv1.2", "TLSv1.3"] = setting("TLSv1.2", "the oldest TLS version accepted")
    reload_interval_seconds: float = setting(
        10.0,
        "how often the certificate, key and client CA files are checked for changes; `0`: read once",
        ge=0,
        le=3600,
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost`` is the name of one; other names are not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def plain_http_refusal(host: str | None, server: ServerSettings) -> str | None:
    """Why the proxy must not listen on ``host`` (None: a unix socket) as configured, or None. Bearer tokens
    in clear text on a network are anyone's: plain HTTP only on loopback, a unix socket, or when the admin
    says so."""
    if host is None or server.tls is not None or server.allow_plain_http or is_loopback(host):
        return None
    return (
        f"server.host {host!r} is not a loopback address and server.tls is not set: the proxy would take bearer "
        "tokens in clear text over the network. Configure server.tls (cert_file, key_file), listen on loopback "
        "or server.unix_socket, or set server.allow_plain_http: true when TLS ends in front of the proxy "
        "(an ingress, a load balancer on the same host)"
    )


class ServerSettings(_Section):
    host: str = setting("127.0.0.1", "where the proxy listens")
    port: int = setting(8080, "the TCP port it listens on", ge=0, le=65535)
    workers: int = setting(1, "uvicorn worker processes", ge=1, le=64)
    request_id_header: str = setting(
        "X-Request-ID",
        "request id taken from the client (if well-formed) or generated; sent to slurmrestd, returned to the "
        "client, recorded in the audit",
    )
    max_body_bytes: int = setting(MiB, "larger request bodies get 413", shown="1 MiB", ge=1024)
    max_token_bytes: int = setting(16 * 1024, "longer bearer tokens get 401", shown="16 KiB", ge=512)
    trusted_proxies: tuple[IPvAnyNetwork, ...] = setting(
        (),
        "addresses or CIDRs of proxies in front (an ingress): only from them is `X-Forwarded-For` believed, "
        "for the audit record's `client`",
        shown="none",
    )
    header_timeout_seconds: float = setting(
        10.0,
        "time to send the request line and headers, from connecting (or from the first byte after a response); "
        "408 and close after it ([slow clients](docs/reliability.md#slow-and-abusive-clients))",
        gt=0,
        le=300,
    )
    body_timeout_seconds: float = setting(
        30.0,
        "time to send a whole request body once the proxy reads it (408), and to take each part of an answer "
        "(else the connection is closed)",
        gt=0,
        le=3600,
    )
    keep_alive_seconds: int = setting(5, "idle keep-alive connections are closed after it", ge=1, le=300)
    max_header_bytes: int = setting(
        64 * 1024, "larger request line plus headers get 431", shown="64 KiB", ge=4096, le=MiB
    )
    max_connections: int = setting(
        1000,
        "per worker: beyond this many open connections (or requests in progress), requests get 503 `overloaded` "
        "with `Retry-After`",
        ge=1,
    )
    unix_socket: ConfigPath | None = setting(
        None,
        "listen on this unix socket instead of `host` and `port` (plain HTTP, for a local TLS terminator)",
        shown="none",
    )
    tls: TlsSettings | None = setting(
        None, "serve HTTPS with these files (below); without it, plain HTTP only on loopback", shown="none"
    )
    allow_plain_http: bool = setting(
        False,
        "serve plain HTTP on a non-loopback `host` (TLS ends in front of the proxy: an ingress, a load balancer); "
        "otherwise such a configuration is refused at start-up",
    )

    @model_validator(mode="after")
    def _no_tokens_in_clear_text(self) -> ServerSettings:
        refusal = plain_http_refusal(None if self.unix_socket is not None else self.host, self)
        if refusal is not None:
            raise ValueError(refusal)
        return self

    @model_validator(mode="after")
    def _headers_fit_a_token(self) -> ServerSettings:
        if self.max_header_bytes < self.max_token_bytes + 1024:
            raise ValueError(
                f"max_header_bytes ({self.max_header_bytes}) must exceed max_token_bytes ({self.max_token_bytes}) "
                "by at least 1024"
            )
        return self


def _http_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("https://", "http://")):
        raise ValueError(f"must be an http(s) URL, got {value!r}")
    return value


class IssuerSettings(_Section):
    preset: PresetName | None = setting(
        None,
        "`egi-checkin`, `egi-checkin-demo` or `egi-checkin-dev`: all of an issuer's settings for EGI Check-in in "
        "one line; settings written next to it override the preset's (see "
        "[Tokens and identity providers](#tokens-and-identity-providers))",
        shown="none",
    )
    issuer: str = setting(
        description="the exact `iss` value of a trusted provider; Check-in's retired `https://aai*.egi.eu/oidc/` "
        "issuers are refused at load",
        shown="(required, or from the preset)",
    )
    audiences: tuple[str, ...] = setting(
        (),
        "if set, `aud` must contain one of them (for opaque tokens: the introspection answer's `aud`)",
        shown="none",
    )
    clients: tuple[str, ...] = setting(
        (),
        "if set, the client the token was issued to (`azp`, `client_id`; for opaque tokens the introspection "
        "answer's `client_id`) must be one of them, else 401 `wrong_client`: with no `audiences` either, any "
        "relying party of the issuer that holds a user's token could replay it here (`check-config` warns)",
        shown="none",
    )
    require_at_jwt: bool = setting(
        False,
        "the JOSE header's `typ` must be `at+jwt` (RFC 9068), else 401 `wrong_token_type`: for issuers that type "
        "their JWT access tokens so (Check-in does not: its header says `JWT`)",
    )
    algorithms: tuple[str, ...] = setting(
        ("RS256", "ES256"), "allowed JWS algorithms; asymmetric only (`none` and `HS*` are refused at load)"
    )
    jwks_uri: str | None = setting(
        None, "key set URL; otherwise `<issuer>/.well-known/openid-configuration`", shown="from discovery"
    )
    leeway_seconds: int = setting(30, "clock skew allowed on `exp`, `nbf`, `iat`", ge=0, le=300)
    token_types: tuple[str, ...] = setting(
        (),
        "if set, a JWT's `typ` claim must be one of them (Keycloak access tokens say `Bearer`; ID and refresh "
        "tokens do not)",
        shown="none",
    )
    subject_claim: tuple[str, ...] = setting(
        ("sub",), "the claim that identifies the user, or a list of claims: the first one present wins"
    )
    subject_source: ClaimSource | None = setting(
        None, "where the subject claim is read: `token`, `userinfo` or `introspection`", shown="= `entitlements_source`"
    )
    entitlement_claims: tuple[str, ...] = setting(
        ("eduperson_entitlement", "entitlements"), "claims read for AARC entitlements"
    )
    entitlements_source: ClaimSource = setting(
        "token", "where entitlements are read: `token`, `userinfo` or `introspection`"
    )
    accept_opaque_tokens: bool = setting(
        False,
        "tokens that are not JWTs are sent to this issuer's introspection endpoint; **at most one issuer** may set it",
    )
    opaque_token_pattern: str | None = setting(
        None,
        "a regular expression (whole token) that this issuer's opaque tokens match, e.g. `[A-Za-z0-9_-]{43}`; "
        "others get 401 `malformed_token` without an introspection. Default: 16 to 4096 token characters, and "
        "not a broken JWT (`eyJ…`)",
        shown="any plausible token",
    )
    userinfo_endpoint: str | None = setting(
        None,
        "the userinfo endpoint URL; a discovered `http://` endpoint is refused for an `https://` issuer",
        shown="from discovery",
    )
    introspection_endpoint: str | None = setting(
        None,
        "the introspection endpoint URL; a discovered `http://` endpoint is refused for an `https://` issuer",
        shown="from discovery",
    )
    client_id: str | None = setting(
        None,
        "the proxy's client at the provider, for introspection (required when introspection is used)",
        shown="—",
    )
    client_secret_file: ConfigPath | None = setting(
        None,
        "file holding that client's secret (one line); read at start-up and by `check-config`, never logged",
        shown="—",
    )
    client_auth_method: Literal["client_secret_basic", "client_secret_post"] = setting(
        "client_secret_basic", "how the client authenticates at introspection: or `client_secret_post`"
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        return with_preset(data) if isinstance(data, dict) else data

    @field_validator("subject_claim", mode="before")
    @classmethod
    def _one_or_more_claims(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("issuer")
    @classmethod
    def _issuer_is_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"issuer must be an http(s) URL, got {value!r}")
        if legacy_checkin_issuer(value):
            raise ValueError(f"{value!r} is a retired EGI Check-in issuer; use `preset: egi-checkin` (or -demo, -dev)")
        return value

    @field_validator("opaque_token_pattern")
    @classmethod
    def _a_token_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from exc
        return value

    @field_validator("userinfo_endpoint", "introspection_endpoint", "jwks_uri")
    @classmethod
    def _endpoint_is_url(cls, value: str | None) -> str | None:
        return _http_url(value)

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one algorithm is required")
        bad = [alg for alg in value if alg not in ASYMMETRIC_ALGORITHMS]
        if bad:
            raise ValueError(f"not an allowed asymmetric JWS algorithm: {', '.join(bad)}")
        return value

    @field_validator("subject_claim", "entitlement_claims")
    @classmethod
    def _some_claims(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not all(value):
            raise ValueError("name at least one claim, and no empty names")
        return value

    @property
    def claim_sources(self) -> frozenset[str]:
        """The sources a token of this issuer is read from (besides the token itself)."""
        return frozenset({self.subject_source or self.entitlements_source, self.entitlements_source})

    @property
    def uses_introspection(self) -> bool:
        return self.accept_opaque_tokens or "introspection" in self.claim_sources

    @model_validator(mode="after")
    def _introspection_client(self) -> IssuerSettings:
        if self.uses_introspection and (self.client_id is None or self.client_secret_file is None):
            raise ValueError(
                f"issuer {self.issuer}: introspection (accept_opaque_tokens or a source 'introspection') needs "
                "client_id and client_secret_file"
            )
        return self


class OidcSettings(_Section):
    issuers: tuple[IssuerSettings, ...] = setting(
        (), "the trusted token issuers (below); nothing else is trusted", shown="none"
    )
    http_timeout_seconds: float = setting(
        5.0, "timeout of every call to a provider (discovery, keys, userinfo, introspection)", gt=0, le=60
    )
    jwks_cache_seconds: int = setting(
        3600,
        "age at which a key set is refreshed (in the background: requests keep using the current keys)",
        ge=1,
    )
    jwks_min_refetch_seconds: float = setting(
        60.0, "an unknown `kid` refetches the key set at most this often per issuer", ge=1
    )
    token_cache_seconds: int = setting(
        300,
        "longest a validated token, with its userinfo or introspection answer, is reused; never past the token's "
        "`exp` (+ leeway)",
        ge=1,
    )
    token_cache_size: int = setting(
        10_000,
        "most tokens cached (least recently used go first); refusals are cached separately, with the same bound",
        ge=1,
    )
    failure_cache_seconds: float = setting(
        5.0,
        "how long a refused token or a provider failure is remembered per token, and how long a failed key-set "
        "fetch is not retried",
        ge=0,
    )
    introspection_concurrency: int = setting(
        8,
        "per worker: opaque tokens not seen before that are being introspected at once; beyond it 503 "
        "`introspection_busy` ([the introspection budget](docs/operations.md#the-introspection-budget))",
        ge=1,
    )
    introspection_per_second: float = setting(
        10.0, "per worker: opaque tokens not seen before introspected per second, from everyone", gt=0
    )
    introspection_burst: int = setting(
        20, "… and at most this many at once after a quiet spell; beyond: 503 `introspection_budget_exhausted`", ge=1
    )
    introspection_per_client_per_second: float = setting(
        1.0, "per worker: opaque tokens not seen before introspected per second from one client address", gt=0
    )
    introspection_per_client_burst: int = setting(
        10, "… and at most this many at once; beyond: 429 `introspection_rate_limited`", ge=1
    )

    @model_validator(mode="after")
    def _unique_issuers(self) -> OidcSettings:
        seen = [i.issuer for i in self.issuers]
        dupes = sorted({i for i in seen if seen.count(i) > 1})
        if dupes:
            raise ValueError(f"issuer configured twice: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _one_opaque_issuer(self) -> OidcSettings:
        # An opaque token names no issuer: sending it to two providers would leak it to the wrong one.
        opaque = [i.issuer for i in self.issuers if i.accept_opaque_tokens]
        if len(opaque) > 1:
            raise ValueError(f"at most one issuer may accept opaque tokens, got {', '.join(opaque)}")
        return self


class UpstreamSettings(_Section):
    url: str = setting(description="slurmrestd: `http://host:port` or `unix:/path`", shown="(required)")
    auth: Literal["mint", "service_token"] = setting(
        "mint",
        "`mint`: sign a short-lived HS256 Slurm JWT (`iat`, `exp`, `sun`) per mapped user with `jwt_key_file`; "
        "`service_token`: send the SlurmUser token in `service_token_file` with `X-SLURM-USER-NAME`",
    )
    jwt_key_file: ConfigPath | None = setting(None, "Slurm's `jwt_hs256.key` (mode `mint`)", shown="—")
    service_token_file: ConfigPath | None = setting(
        None,
        "a SlurmUser token, e.g. the output of `scontrol token username=slurm` (mode `service_token`); re-read "
        "when the file changes",
        shown="—",
    )
    jwt_lifetime_seconds: int = setting(
        300, "lifetime of minted Slurm JWTs; re-minted after 80 % of it", ge=30, le=86400
    )
    timeout_seconds: float = setting(60.0, "read timeout; 504 after it", gt=0)
    connect_timeout_seconds: float = setting(5.0, "connect timeout; 502 after it", gt=0)
    max_connections: int = setting(
        16,
        "pooled keep-alive connections to slurmrestd per worker; requests beyond it wait for a free connection "
        "(slurmrestd serves a few threads, more connections only queue there)",
        ge=1,
    )
    max_connections_per_identity: int = setting(
        4,
        "per worker: most of those connections one identity (issuer + subject) may hold at once, from sending "
        "its request to the end of slurmrestd's answer; beyond it, 429 `too_many_concurrent_requests` with "
        "`Retry-After` (so that one caller's slow requests cannot take every connection)",
        ge=1,
    )
    keepalive_seconds: float = setting(
        5.0,
        "an idle pooled connection is closed after it (keep it below slurmrestd's own idle timeout)",
        ge=0,
    )
    discovery_user: str = setting(
        "nobody",
        "the account named in the credential that reads slurmrestd's OpenAPI document (see "
        "[Slurm versions](#slurm-versions)); never root, the SlurmUser or a denied account",
        pattern=USER_NAME_PATTERN,
    )
    api_versions_refresh_seconds: int = setting(
        300,
        "how often the served API versions are re-read; `0` turns version discovery (and the 404 for unserved "
        "versions) off",
        ge=0,
    )

    @field_validator("api_versions_refresh_seconds")
    @classmethod
    def _refresh_not_too_often(cls, value: int) -> int:
        if 0 < value < MIN_API_VERSIONS_REFRESH_SECONDS:
            raise ValueError(f"must be 0 (off) or at least {MIN_API_VERSIONS_REFRESH_SECONDS}")
        return value

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: str) -> str:
        if not value.startswith(("http://", "https://", "unix:")):
            raise ValueError(f"upstream url must start with http://, https:// or unix:, got {value!r}")
        return value

    @model_validator(mode="after")
    def _credential_present(self) -> UpstreamSettings:
        if self.auth == "mint" and self.jwt_key_file is None:
            raise ValueError("auth 'mint' needs jwt_key_file")
        if self.auth == "service_token" and self.service_token_file is None:
            raise ValueError("auth 'service_token' needs service_token_file")
        return self


_ACCOUNT_RANGE = re.compile(r"([a-z_][a-z0-9_-]*?)([0-9]+)\.\.([a-z_][a-z0-9_-]*?)([0-9]+)")


def expand_accounts(items: tuple[str, ...]) -> tuple[str, ...]:
    """``pool001..pool050`` → ``pool001``, ``pool002``, … ``pool050`` (zero-padded when both ends have
    the same width; ``vo8..vo12`` is not padded); plain names stay as they are. Raises ValueError on a
    malformed item or a duplicate."""
    out: list[str] = []
    for item in items:
        match = _ACCOUNT_RANGE.fullmatch(item)
        if match is None:
            if not is_user_name(item):
                raise ValueError(f"{item!r} is neither a POSIX user name nor a range like pool001..pool050")
            out.append(item)
            continue
        prefix, first, prefix2, last = match.groups()
        padded = len(first) == len(last)
        if prefix != prefix2 or int(first) > int(last) or (not padded and "0" in (first[0], last[0])):
            raise ValueError(f"{item!r}: a range is low..high with one prefix: pool001..pool050 or vo8..vo12")
        if int(last) - int(first) >= MAX_POOL_ACCOUNTS:
            raise ValueError(f"{item!r}: more than {MAX_POOL_ACCOUNTS} accounts")
        width = len(first) if padded else 0
        out.extend(f"{prefix}{n:0{width}d}" for n in range(int(first), int(last) + 1))
    bad = [name for name in out if not is_user_name(name)]
    if bad:
        raise ValueError(f"not a valid POSIX user name: {bad[0]!r}")
    dupes = sorted(name for name, count in Counter(out).items() if count > 1)
    if dupes:
        raise ValueError(f"account listed twice: {', '.join(dupes[:5])}")
    return tuple(out)


class AliseSettings(_Section):
    """One ALISE account-linking service. The API key is read from a file."""

    url: str = setting(
        description="an ALISE account-linking service used by policy steps `alise: NAME` (its base URL, without "
        "`/api/v1`) ([docs/identity.md](docs/identity.md#alise))",
        shown="(required)",
    )
    site: str = setting(description="the ALISE target site: the name of its internal OP config", shown="(required)")
    apikey_file: ConfigPath = setting(
        description="the file holding ALISE's API key, read at start-up and never logged", shown="(required)"
    )
    timeout_seconds: float = setting(3.0, "whole-lookup timeout; a timeout is an ALISE outage", gt=0, le=60)
    connect_timeout_seconds: float = setting(2.0, "connect timeout; a timeout is an ALISE outage", gt=0, le=60)
    cache_seconds: int = setting(300, "how long a found mapping is reused", ge=0)
    miss_cache_seconds: int = setting(30, 'how long a "not linked" answer is reused', ge=0)
    cache_size: int = setting(10_000, "identities kept in each cache (found, not linked, last known)", ge=1)
    outage: Literal["fail_closed", "last_known"] = setting(
        "fail_closed",
        "on an ALISE failure: 503, or (`last_known`) the identity's last found mapping if younger than "
        "`last_known_max_age_seconds`",
    )
    last_known_max_age_seconds: int = setting(86_400, "the oldest answer `last_known` may serve", ge=1)
    max_connections: int = setting(20, "pooled connections to ALISE", ge=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")) or "?" in value or "#" in value:
            raise ValueError(f"url must be an http(s) URL without query or fragment, got {value!r}")
        return value.rstrip("/")

    @field_validator("site")
    @classmethod
    def _site_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", value):
            raise ValueError(f"site must be a name of letters, digits, '.', '_' or '-', got {value!r}")
        return value


class PoolSettings(_Section):
    """A pool of local accounts leased to identities that have no other mapping."""

    accounts: tuple[str, ...] = setting(
        description="pool accounts for policy steps `pool: NAME`: names and ranges like `vo001..vo050` "
        "([docs/identity.md](docs/identity.md#pool-accounts))",
        shown="(required)",
        min_length=1,
    )

    idle_expiry_seconds: int | None = setting(
        None,
        "a lease unused for this long may be given to a newcomer when the pool has no free account left (its "
        "holder keeps it until then); at least 600. Default: leases never expire "
        "([docs/identity.md](docs/identity.md#pool-accounts))",
        shown="none",
        ge=MIN_LEASE_IDLE_EXPIRY_SECONDS,
    )
    max_new_leases: int | None = setting(
        None,
        "admission rate: at most this many new leases per `new_lease_period_seconds` across the deployment; a "
        "newcomer beyond it gets 429 `pool_admission_limited` with `Retry-After`. Default: no limit",
        shown="none",
        ge=1,
    )
    new_lease_period_seconds: int = setting(3600, "the window of `max_new_leases` (sliding)", ge=1, le=30 * 86400)

    @field_validator("accounts")
    @classmethod
    def _expand(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return expand_accounts(value)


class IdentitySettings(_Section):
    min_uid: int = setting(1000, "local accounts with a lower uid are refused", ge=1)
    slurm_user: str = setting("slurm", "the cluster's SlurmUser; never mapped to")
    denied_users: tuple[str, ...] = setting(("root",), "further accounts never mapped to")
    require_local_account: bool = setting(
        True,
        "refuse (403 `account_unknown`) accounts missing from this host's user database, whose uid cannot be "
        "checked (a cluster's `slurmdbd`, `mysql`, a uid-0 alias), unless `unknown_accounts` names them; `false` "
        "passes every such name on unchecked (`check-config` warns)",
    )
    unknown_accounts: str | None = setting(
        None,
        "a regular expression (whole name): accounts that may be used although this host cannot look them up, "
        "for a proxy whose host or container lacks the cluster's users, e.g. `svc-[a-z]+|pool[0-9]{3}`; their "
        "uid is not checked ([docs/identity.md](docs/identity.md#safety-every-answer-passes-the-guard))",
        shown="none",
    )
    alise: dict[str, AliseSettings] = setting(
        default_factory=dict, description="ALISE services by name (below)", shown="none"
    )
    pools: dict[str, PoolSettings] = setting(
        default_factory=dict, description="account pools by name (below)", shown="none"
    )
    pool_database: ConfigPath | None = setting(
        None,
        "SQLite file (WAL) of the leases, shared by the workers, kept across restarts (with `state.backend: "
        "shared` the leases are in PostgreSQL instead)",
        shown="none (required with pools)",
    )

    @field_validator("unknown_accounts")
    @classmethod
    def _a_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _pools_consistent(self) -> IdentitySettings:
        owner: dict[str, str] = {}
        for name, pool in self.pools.items():
            if not is_user_name(name):
                raise ValueError(f"pool name {name!r} must be lowercase letters, digits, '_' or '-'")
            for account in pool.accounts:
                if account in owner:
                    raise ValueError(f"account {account} is in pools {owner[account]} and {name}")
                owner[account] = name
        for name in self.alise:
            if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
                raise ValueError(f"ALISE name {name!r} must be letters, digits, '.', '_' or '-'")
        return self


class PolicySettings(_Section):
    paths: tuple[ConfigPath, ...] = setting(
        (Path("policies"),),
        "policy files, or directories of `*.yaml` files read in name order",
        shown="`[policies]`",
        validate_default=True,
    )
    reload_interval_seconds: float = setting(
        2.0,
        "how often the policy files are checked for changes; a change is loaded once stable for one interval; "
        "`0`: only on `SIGHUP` (see [docs/policy.md](docs/policy.md#changing-the-policy-live))",
        ge=0,
        le=3600,
    )


class AuditSettings(_Section):
    sink: Literal["stdout", "file"] = setting("stdout", "`stdout` or `file`")
    file: ConfigPath | None = setting(None, "the audit file when `sink: file`", shown="—")
    max_bytes: int = setting(
        100 * MiB,
        "rotate the file before it grows past this (renamed to `<file>.<UTC time>`; safe with several workers); "
        "`0` never rotates",
        shown="100 MiB",
        ge=0,
    )
    keep: int = setting(0, "rotated files kept, the oldest deleted; `0` keeps all", ge=0)
    fail_closed: bool = setting(
        True,
        "refuse (503 `audit_unavailable`) a request whose record cannot be written, and (file sink) refuse before "
        "forwarding when the audit file's filesystem is full or read-only or the file cannot be opened; `false`: "
        "log the record on stderr instead, count the failure, answer",
    )
    pseudonym_key_file: ConfigPath | None = setting(
        None,
        "record subjects as a keyed hash (HMAC-SHA256) with the key in this file ([docs/audit.md](docs/audit.md))",
        shown="—",
    )
    queue_size: int = setting(
        1024,
        "per worker: records waiting for the writer thread; a record beyond it is not written (the sink cannot "
        "keep up) and, with `fail_closed`, its request refused ([docs/audit.md](docs/audit.md#sinks-and-rotation))",
        ge=1,
    )
    write_timeout_seconds: float = setting(
        5.0,
        "longest a record waits for its write to start (a stalled stdout pipe, a hung disk); then it is withdrawn, "
        "never written, and handled as a write failure",
        gt=0,
        le=300,
    )

    @model_validator(mode="after")
    def _file_for_file_sink(self) -> AuditSettings:
        if self.sink == "file" and self.file is None:
            raise ValueError("sink 'file' needs file")
        return self


class MetricsSettings(_Section):
    enabled: bool = setting(True, "serve Prometheus metrics ([docs/operations.md](docs/operations.md#metrics))")
    path: str = setting("/metrics", "where the metrics are served", pattern=r"^/[A-Za-z0-9/._\-]*$")
    port: int | None = setting(
        None,
        "serve the metrics on a listener of their own at this TCP port (and no longer on the main port), for "
        "Prometheus only; the Helm chart does ([docs/operations.md](docs/operations.md#metrics))",
        shown="none: the main port",
        ge=1,
        le=65535,
    )
    host: str | None = setting(None, "where that listener binds", shown="= `server.host`")
    multiprocess_dir: ConfigPath | None = setting(
        None,
        "with several workers: where they keep their metric values (emptied at start)",
        shown="a fresh temporary directory",
    )

    @field_validator("path")
    @classmethod
    def _outside_slurmrestd_paths(cls, value: str) -> str:
        if is_reserved(value):
            raise ValueError(f"metrics path must not be / or under a slurmrestd or /_slurmproxy path, got {value!r}")
        return value


class TracingSettings(_Section):
    endpoint: str | None = setting(
        None,
        "OTLP endpoint to export spans to: `http(s)://host:4318/v1/traces` (OTLP/HTTP) or `host:4317` (OTLP/gRPC); "
        "unset: no tracing, at no cost ([docs/operations.md](docs/operations.md#traces); needs the `tracing` "
        "extra: `pip install 'slurmproxy[tracing]'`)",
        shown="none (off)",
    )
    protocol: Literal["http/protobuf", "grpc"] = setting("http/protobuf", "`http/protobuf` or `grpc`")
    insecure: bool = setting(False, "OTLP/gRPC without TLS (a collector on loopback)")
    ca_file: ConfigPath | None = setting(
        None, "CA certificates (PEM) the collector's certificate is checked with", shown="system CAs"
    )
    headers_file: ConfigPath | None = setting(
        None,
        "a file of `Name: value` lines sent with every export (a collector's API key); never logged",
        shown="—",
    )
    service_name: str = setting("slurmproxy", "the `service.name` of the spans' resource")
    sample_ratio: float = setting(
        1.0,
        "share of new traces recorded; a caller's `traceparent` decides for its own trace (parent-based)",
        ge=0,
        le=1,
    )
    include_identity: bool = setting(
        False,
        "add the issuer's subject and the local account to the spans (personal data: off unless your privacy "
        "notice covers it); tokens are never in spans",
    )
    timeout_seconds: float = setting(10.0, "timeout of one export; spans are sent in the background", gt=0, le=60)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _endpoint_fits_protocol(self) -> TracingSettings:
        if self.endpoint is None:
            return self
        is_url = self.endpoint.startswith(("http://", "https://"))
        if self.protocol == "http/protobuf" and not is_url:
            raise ValueError(f"endpoint must be an http(s) URL for protocol http/protobuf, got {self.endpoint!r}")
        return self

    @property
    def enabled(self) -> bool:
        return self.endpoint is not None


class ShieldCacheRule(_Section):
    path: str = setting(description="a path pattern, as in policy files (e.g. `/slurm/{version}/jobs`)")
    ttl_seconds: float = setting(description="how long an answer may be served again", gt=0, le=60)

    @field_validator("path")
    @classmethod
    def _pattern(cls, value: str) -> str:
        compile_path(value)  # raises ValueError naming the problem
        return value


class ShieldSettings(_Section):
    coalesce: bool = setting(
        True,
        "concurrent identical GETs without a body (same local account, path, query and forwarded headers but "
        "`User-Agent`) share one request to slurmrestd "
        "([docs/performance.md](docs/performance.md#the-polling-shield-benchshield))",
    )
    cache: tuple[ShieldCacheRule, ...] = setting(
        (),
        "per-path response cache, per local account: a list of `{path: PATTERN, ttl_seconds: N}` (N at most 60), "
        "e.g. `{path: /slurm/{version}/jobs, ttl_seconds: 2}`",
        shown="none",
    )
    max_body_bytes: int = setting(
        32 * MiB,
        "per worker: a larger answer is streamed to its own caller only, never shared or cached",
        shown="32 MiB",
        ge=1024,
    )
    max_bytes: int = setting(
        256 * MiB,
        "per worker: an answer that would take the bodies held (shared, being sent, cached) past it is streamed "
        "to its own caller only; cached answers are kept",
        shown="256 MiB",
        ge=1024,
    )
    max_entries: int = setting(4096, "per worker: cached answers kept", ge=1)


class RedisSettings(_Section):
    """Redis (or a server that speaks its protocol, such as Valkey): rate limits and the shield's cache."""

    url: str = setting(
        description="`redis://host:6379/0`, `rediss://…` for TLS, or `unix:///path/redis.sock`; no password in it",
        shown="(required with `backend: shared`)",
    )
    username: str | None = setting(None, "an ACL user name (Redis 6+); default: the `default` user", shown="—")
    password_file: ConfigPath | None = setting(None, "the file holding the password (one line)", shown="—")
    ca_file: ConfigPath | None = setting(None, "CA bundle that verifies the server (`rediss://`)", shown="system CAs")
    cert_file: ConfigPath | None = setting(None, "client certificate, when Redis requires one", shown="—")
    key_file: ConfigPath | None = setting(None, "the client certificate's key", shown="—")
    timeout_seconds: float = setting(
        0.5,
        "longest one rate-limit check or cache read or write may take, waiting for a connection included",
        gt=0,
        le=30,
    )
    connect_timeout_seconds: float = setting(1.0, "connect timeout (TCP and TLS)", gt=0, le=30)
    max_connections: int = setting(32, "per worker: pooled connections", ge=1, le=1024)
    key_prefix: str = setting(
        "slurmproxy:",
        "prefix of every key, so that deployments can share one Redis",
        pattern=r"^[A-Za-z0-9:._-]{1,64}$",
    )

    @field_validator("url")
    @classmethod
    def _no_secret_in_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must start with redis://, rediss:// or unix://, got {value.split('@')[-1]!r}")
        if "@" in value.split("//", 1)[1].split("/", 1)[0]:
            raise ValueError("url must not hold a user or password: use username and password_file")
        if "password=" in value:
            raise ValueError("url must not hold a password: use password_file")
        return value

    @model_validator(mode="after")
    def _tls_consistent(self) -> RedisSettings:
        if (self.ca_file or self.cert_file or self.key_file) and not self.url.startswith("rediss://"):
            raise ValueError("ca_file, cert_file and key_file need a rediss:// url")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class PostgresSettings(_Section):
    """PostgreSQL: pool leases and ALISE's last-known answers (durable, transactional)."""

    dsn: str = setting(
        description="a libpq connection string or URL without the password, e.g. "
        "`postgresql://slurmproxy@db.example.org:5432/slurmproxy`",
        shown="(required with pools or `outage: last_known` and `backend: shared`)",
    )
    password_file: ConfigPath | None = setting(None, "the file holding the role's password (one line)", shown="—")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = setting(
        None, "libpq's `sslmode`; with `ca_file` set, `verify-full` unless given", shown="the DSN's, or `prefer`"
    )
    ca_file: ConfigPath | None = setting(None, "CA bundle that verifies the server (`sslrootcert`)", shown="—")
    cert_file: ConfigPath | None = setting(None, "client certificate (`sslcert`)", shown="—")
    key_file: ConfigPath | None = setting(None, "the client certificate's key (`sslkey`)", shown="—")
    pool_size: int = setting(4, "per worker: pooled connections", ge=1, le=256)
    timeout_seconds: float = setting(
        2.0, "longest one lease or last-known operation may take, waiting for a connection included", gt=0, le=60
    )
    connect_timeout_seconds: int = setting(2, "connect timeout (libpq counts whole seconds, at least 2)", ge=2, le=60)

    @field_validator("dsn")
    @classmethod
    def _no_secret_in_dsn(cls, value: str) -> str:
        if re.search(r"(^|\s|[?&])password\s*=", value) or re.match(r"^postgres(ql)?://[^/@]*:[^/@]*@", value):
            raise ValueError("dsn must not hold a password: use password_file")
        return value

    @model_validator(mode="after")
    def _tls_consistent(self) -> PostgresSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class StateSettings(_Section):
    """Where the state policies rely on lives: in each process (embedded) or shared by every replica."""

    backend: Literal["embedded", "shared"] = setting(
        "embedded",
        "`embedded`: rate limits and the shield's cache in each worker, pool leases in `identity.pool_database`, "
        "ALISE's last-known answers in each worker (one machine); `shared`: in Redis and PostgreSQL, the same for "
        "every replica ([docs/operations.md](docs/operations.md#scaling-out))",
    )
    redis: RedisSettings | None = setting(None, "Redis (rate limits, the shield's cache)", shown="none")
    postgres: PostgresSettings | None = setting(
        None, "PostgreSQL (pool leases, ALISE's last-known answers)", shown="none"
    )
    rate_limit_outage: Literal["fail_closed", "local"] = setting(
        "fail_closed",
        "when Redis fails: refuse requests under rate-limited rules (503 `rate_limit_unavailable`), or (`local`) "
        "count them in each worker until Redis is back (N workers then allow N times the limit)",
    )
    shield_outage: Literal["local", "fail_closed"] = setting(
        "local",
        "when Redis fails: cached paths use each worker's own cache, or (`fail_closed`) get 503 "
        "`shield_cache_unavailable`",
    )
    retry_seconds: float = setting(
        1.0,
        "after a failure, requests no longer ask the backend (they get the outage behaviour at once); a background "
        "probe asks it this often, and it is used again as soon as it answers",
        gt=0,
        le=60,
    )
    hash_key_file: ConfigPath | None = setting(
        None,
        "a key for the HMAC-SHA256 that turns identities into Redis keys and last-known rows; without it a plain "
        "SHA-256 (set it when subjects are guessable)",
        shown="—",
    )

    @model_validator(mode="after")
    def _shared_needs_redis(self) -> StateSettings:
        if self.backend == "shared" and self.redis is None:
            raise ValueError("backend 'shared' needs redis (url, password_file, …)")
        return self


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = setting("INFO", "application log level (stderr)")
    json_format: bool = Field(False, description="application logs as JSON lines", alias="json")


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_data.get() or {})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLURMPROXY_", env_nested_delimiter="__", extra="forbid", frozen=True)

    server: ServerSettings = Field(default_factory=ServerSettings)
    oidc: OidcSettings = Field(default_factory=OidcSettings)
    upstream: UpstreamSettings
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    shield: ShieldSettings = Field(default_factory=ShieldSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @model_validator(mode="after")
    def _metrics_port_is_its_own(self) -> Settings:
        if self.metrics.port is not None and self.metrics.port == self.server.port:
            raise ValueError(f"metrics.port must differ from server.port ({self.server.port})")
        return self

    @model_validator(mode="after")
    def _discovery_user_is_safe(self) -> Settings:
        user = self.upstream.discovery_user
        if user in {"root", self.identity.slurm_user, *self.identity.denied_users}:
            raise ValueError(f"upstream.discovery_user must not be root, the SlurmUser or a denied account: {user!r}")
        return self

    @model_validator(mode="after")
    def _state_holds_what_needs_it(self) -> Settings:
        identity, shared = self.identity, self.state.backend == "shared"
        if identity.pools and not shared and identity.pool_database is None:
            raise ValueError("identity: pools need pool_database (a SQLite file all workers share)")
        if shared and self.state.postgres is None:
            if identity.pools:
                raise ValueError("identity.pools with state.backend 'shared' need state.postgres (the leases)")
            if any(a.outage == "last_known" for a in identity.alise.values()):
                raise ValueError("ALISE outage 'last_known' with state.backend 'shared' needs state.postgres")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))


def format_validation_errors(source: str, errors: list[dict[str, Any]]) -> str:
    lines = [f"{source}: {len(errors)} error(s)"]
    for err in errors:
        where = ".".join(str(part) for part in err.get("loc", ())) or "(top level)"
        lines.append(f"  {where}: {err.get('msg', 'invalid')}")
    return "\n".join(lines)


def load_settings(path: Path | None, **overrides: Any) -> Settings:
    """Read and validate the config file (plus environment); raise ConfigError naming file and field."""
    from pydantic import ValidationError

    data: dict[str, Any] = {}
    base = Path.cwd()
    source = "environment"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
        base = path.resolve().parent
    base_token = _base_dir.set(base)
    data_token = _yaml_data.set(data)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_errors(source, list(exc.errors()))) from exc  # type: ignore[arg-type]
    finally:
        _yaml_data.reset(data_token)
        _base_dir.reset(base_token)
