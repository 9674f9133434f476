"""Process configuration: one YAML file, overridable by ``SLURMPROXY_*`` environment variables.

Precedence (highest first): environment variables (``SLURMPROXY_UPSTREAM__URL``, nested with
``__``), then the YAML file given to ``slurmproxy serve --config FILE``, then the defaults below.
Relative paths in the file are resolved against the file's directory. Secrets are never values
here: only paths to files that hold them (``*_file``).
"""

from __future__ import annotations

import contextvars
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, IPvAnyNetwork, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from slurmproxy.errors import ProxyError
from slurmproxy.presets import PresetName, legacy_checkin_issuer, with_preset

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_MAX_TOKEN_BYTES = 16 * 1024
DEFAULT_LEEWAY_SECONDS = 30
DEFAULT_ALGORITHMS = ("RS256", "ES256")
DEFAULT_HTTP_TIMEOUT_SECONDS = 5.0
DEFAULT_JWKS_CACHE_SECONDS = 3600
DEFAULT_UPSTREAM_TIMEOUT_SECONDS = 60.0
DEFAULT_UPSTREAM_CONNECT_TIMEOUT_SECONDS = 5.0
DEFAULT_UPSTREAM_MAX_CONNECTIONS = 16
DEFAULT_UPSTREAM_KEEPALIVE_SECONDS = 5.0
DEFAULT_SLURM_JWT_LIFETIME_SECONDS = 300
DEFAULT_DISCOVERY_USER = "nobody"
DEFAULT_API_VERSIONS_REFRESH_SECONDS = 300
MIN_API_VERSIONS_REFRESH_SECONDS = 10
DEFAULT_MIN_UID = 1000
DEFAULT_SLURM_USER = "slurm"
DEFAULT_ALISE_TIMEOUT_SECONDS = 3.0
DEFAULT_ALISE_CONNECT_TIMEOUT_SECONDS = 2.0
DEFAULT_ENTITLEMENT_CLAIMS = ("eduperson_entitlement", "entitlements")
DEFAULT_JWKS_MIN_REFETCH_SECONDS = 60.0
DEFAULT_TOKEN_CACHE_SECONDS = 300
DEFAULT_TOKEN_CACHE_SIZE = 10_000
DEFAULT_FAILURE_CACHE_SECONDS = 5.0
DEFAULT_POLICY_RELOAD_INTERVAL_SECONDS = 2.0
DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0
DEFAULT_BODY_TIMEOUT_SECONDS = 30.0
DEFAULT_KEEP_ALIVE_SECONDS = 5
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_CONNECTIONS = 1000

ClaimSource = Literal["token", "userinfo", "introspection"]
DEFAULT_AUDIT_MAX_BYTES = 100 * 1024 * 1024

# Asymmetric JWS algorithms only (RFC 7518 §3.1). "none" and the HMAC family can never be allowed for
# an identity provider: an HS256 token "signed" with the provider's public key must not validate.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519"}
)

_base_dir: contextvars.ContextVar[Path | None] = contextvars.ContextVar("slurmproxy_config_dir", default=None)
_yaml_data: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("slurmproxy_yaml", default=None)


def _resolve(path: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else ((_base_dir.get() or Path.cwd()) / path)


ConfigPath = Annotated[Path, AfterValidator(_resolve)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = Field(DEFAULT_HOST, description=f"Address to listen on. Defaults to {DEFAULT_HOST}.")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description=f"TCP port. Defaults to {DEFAULT_PORT}.")
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes. Defaults to 1.")
    request_id_header: str = Field("X-Request-ID", description="Header carrying the request id.")
    max_body_bytes: int = Field(
        DEFAULT_MAX_BODY_BYTES, ge=1024, description="Largest request body accepted (413 above). Defaults to 1 MiB."
    )
    max_token_bytes: int = Field(
        DEFAULT_MAX_TOKEN_BYTES, ge=512, description="Longest bearer token accepted (401 above). Defaults to 16 KiB."
    )
    trusted_proxies: tuple[IPvAnyNetwork, ...] = Field(
        (),
        description="Peers (addresses or CIDRs) whose X-Forwarded-For is believed for the audit record's client "
        "address. Defaults to none: the client is the TCP peer.",
    )
    header_timeout_seconds: float = Field(
        DEFAULT_HEADER_TIMEOUT_SECONDS,
        gt=0,
        le=300,
        description="Time a client has to send a request's line and headers, from its first byte (or from "
        "connecting); 408 and close after it. Defaults to 10.",
    )
    body_timeout_seconds: float = Field(
        DEFAULT_BODY_TIMEOUT_SECONDS,
        gt=0,
        le=3600,
        description="Time a client has to send a whole request body once the proxy reads it; 408 after it. "
        "Defaults to 30.",
    )
    keep_alive_seconds: int = Field(
        DEFAULT_KEEP_ALIVE_SECONDS,
        ge=1,
        le=300,
        description="Idle keep-alive connections close after it. Defaults to 5.",
    )
    max_header_bytes: int = Field(
        DEFAULT_MAX_HEADER_BYTES,
        ge=4096,
        le=1024 * 1024,
        description="Largest request line plus headers accepted (431 above). Defaults to 64 KiB.",
    )
    max_connections: int = Field(
        DEFAULT_MAX_CONNECTIONS,
        ge=1,
        description="Open connections (or requests in progress) per worker beyond which requests get 503. "
        "Defaults to 1000.",
    )

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
    preset: PresetName | None = Field(
        None,
        description="Defaults for a known provider (`egi-checkin`, `egi-checkin-demo`, `egi-checkin-dev`); "
        "settings given next to it override the preset's. Defaults to none.",
    )
    issuer: str = Field(description="The exact `iss` value; tokens naming any other issuer are refused.")
    audiences: tuple[str, ...] = Field(
        (), description="If set, the token's `aud` must contain one of these. Defaults to no audience check."
    )
    algorithms: tuple[str, ...] = Field(DEFAULT_ALGORITHMS, description="Allowed JWS algorithms (asymmetric only).")
    jwks_uri: str | None = Field(
        None, description="Key set URL. Defaults to the `jwks_uri` of the issuer's OIDC discovery document."
    )
    leeway_seconds: int = Field(DEFAULT_LEEWAY_SECONDS, ge=0, le=300, description="Clock skew allowed on exp/nbf.")
    token_types: tuple[str, ...] = Field(
        (),
        description="If set, a JWT's `typ` claim must be one of these (Keycloak access tokens say `Bearer`, ID "
        "tokens `ID`). Defaults to no check.",
    )
    subject_claim: tuple[str, ...] = Field(
        ("sub",), description="Claim (or claims, first present wins) that identifies the user. Defaults to `sub`."
    )
    subject_source: ClaimSource | None = Field(
        None,
        description="Where the subject claim is read: token, userinfo or introspection. Defaults to "
        "entitlements_source.",
    )
    entitlement_claims: tuple[str, ...] = Field(
        DEFAULT_ENTITLEMENT_CLAIMS, description="Claims read for AARC entitlements."
    )
    entitlements_source: ClaimSource = Field(
        "token", description="Where entitlements are read: token, userinfo or introspection. Defaults to token."
    )
    accept_opaque_tokens: bool = Field(
        False,
        description="Send tokens that are not JWTs to this issuer's introspection endpoint. At most one issuer "
        "may set it. Defaults to false.",
    )
    userinfo_endpoint: str | None = Field(None, description="Defaults to the discovery document's.")
    introspection_endpoint: str | None = Field(None, description="Defaults to the discovery document's.")
    client_id: str | None = Field(None, description="The proxy's client id for introspection. Defaults to none.")
    client_secret_file: ConfigPath | None = Field(
        None, description="File holding the introspection client's secret. Defaults to none."
    )
    client_auth_method: Literal["client_secret_basic", "client_secret_post"] = Field(
        "client_secret_basic", description="How the client authenticates at introspection."
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
    issuers: tuple[IssuerSettings, ...] = Field((), description="Trusted token issuers. Nothing else is trusted.")
    http_timeout_seconds: float = Field(
        DEFAULT_HTTP_TIMEOUT_SECONDS, gt=0, le=60, description="Timeout of every call to a provider."
    )
    jwks_cache_seconds: int = Field(
        DEFAULT_JWKS_CACHE_SECONDS, ge=1, description="How long a key set is used before it is refreshed."
    )
    jwks_min_refetch_seconds: float = Field(
        DEFAULT_JWKS_MIN_REFETCH_SECONDS,
        ge=1,
        description="An unknown `kid` refetches the key set at most this often per issuer. Defaults to 60.",
    )
    token_cache_seconds: int = Field(
        DEFAULT_TOKEN_CACHE_SECONDS,
        ge=1,
        description="Longest a validated token (with its userinfo/introspection claims) is reused; never past "
        "its exp. Defaults to 300.",
    )
    token_cache_size: int = Field(
        DEFAULT_TOKEN_CACHE_SIZE, ge=1, description="Most tokens held in the cache. Defaults to 10000."
    )
    failure_cache_seconds: float = Field(
        DEFAULT_FAILURE_CACHE_SECONDS,
        ge=0,
        description="How long a refused token or a provider failure is remembered (per token) before it is "
        "tried again. Defaults to 5.",
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
    url: str = Field(description="slurmrestd: `http://host:port` or `unix:/path/to/socket`.")
    auth: Literal["mint", "service_token"] = Field(
        "mint",
        description="`mint`: sign a short-lived Slurm JWT per user with jwt_key_file. "
        "`service_token`: send the SlurmUser token in service_token_file with X-SLURM-USER-NAME.",
    )
    jwt_key_file: ConfigPath | None = Field(None, description="Slurm's jwt_hs256.key (auth: mint).")
    service_token_file: ConfigPath | None = Field(None, description="A SlurmUser token (auth: service_token).")
    jwt_lifetime_seconds: int = Field(DEFAULT_SLURM_JWT_LIFETIME_SECONDS, ge=30, le=86400)
    timeout_seconds: float = Field(DEFAULT_UPSTREAM_TIMEOUT_SECONDS, gt=0, description="Read timeout (504 after).")
    connect_timeout_seconds: float = Field(DEFAULT_UPSTREAM_CONNECT_TIMEOUT_SECONDS, gt=0)
    max_connections: int = Field(
        DEFAULT_UPSTREAM_MAX_CONNECTIONS,
        ge=1,
        description="Connections to slurmrestd per worker process (its own connection handling is limited). "
        f"Defaults to {DEFAULT_UPSTREAM_MAX_CONNECTIONS}.",
    )
    keepalive_seconds: float = Field(
        DEFAULT_UPSTREAM_KEEPALIVE_SECONDS,
        ge=0,
        description="An idle connection to slurmrestd is closed after this long. "
        f"Defaults to {DEFAULT_UPSTREAM_KEEPALIVE_SECONDS}.",
    )
    discovery_user: str = Field(
        DEFAULT_DISCOVERY_USER,
        pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
        description="Account named in the credential that fetches slurmrestd's OpenAPI document (no RPC is made).",
    )
    api_versions_refresh_seconds: int = Field(
        DEFAULT_API_VERSIONS_REFRESH_SECONDS,
        ge=0,
        description="How often the served API versions are re-read from slurmrestd; 0 turns discovery off.",
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


_ACCOUNT_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_ACCOUNT_RANGE = re.compile(r"([a-z_][a-z0-9_-]*?)([0-9]+)\.\.([a-z_][a-z0-9_-]*?)([0-9]+)")
MAX_POOL_ACCOUNTS = 100_000


def expand_accounts(items: tuple[str, ...]) -> tuple[str, ...]:
    """``pool001..pool050`` → ``pool001``, ``pool002``, … ``pool050`` (zero-padded when both ends have
    the same width; ``vo8..vo12`` is not padded); plain names stay as they are. Raises ValueError on a
    malformed item or a duplicate."""
    out: list[str] = []
    for item in items:
        match = _ACCOUNT_RANGE.fullmatch(item)
        if match is None:
            if not _ACCOUNT_NAME.fullmatch(item):
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
    bad = [name for name in out if not _ACCOUNT_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"not a valid POSIX user name: {bad[0]!r}")
    dupes = sorted(name for name, count in Counter(out).items() if count > 1)
    if dupes:
        raise ValueError(f"account listed twice: {', '.join(dupes[:5])}")
    return tuple(out)


class AliseSettings(_Section):
    """One ALISE account-linking service (protocols.md §4). The API key is read from a file."""

    url: str = Field(description="ALISE base URL, e.g. `https://alise.example.org` (no `/api/v1`).")
    site: str = Field(description="The ALISE target site: the name of its internal OP config section.")
    apikey_file: ConfigPath = Field(description="File holding the ALISE API key (sent as the `apikey` query).")
    timeout_seconds: float = Field(DEFAULT_ALISE_TIMEOUT_SECONDS, gt=0, le=60, description="Whole-call timeout.")
    connect_timeout_seconds: float = Field(DEFAULT_ALISE_CONNECT_TIMEOUT_SECONDS, gt=0, le=60)
    cache_seconds: int = Field(300, ge=0, description="How long a found mapping is reused without asking again.")
    miss_cache_seconds: int = Field(30, ge=0, description="How long 'not mapped' is reused without asking again.")
    cache_size: int = Field(10_000, ge=1, description="Identities kept in each cache (found, missed, last known).")
    outage: Literal["fail_closed", "last_known"] = Field(
        "fail_closed",
        description="When ALISE fails: `fail_closed` answers 503; `last_known` serves the mapping last seen for "
        "the identity if it is younger than last_known_max_age_seconds, otherwise 503.",
    )
    last_known_max_age_seconds: int = Field(86_400, ge=1, description="Oldest answer `last_known` may serve.")
    max_connections: int = Field(20, ge=1, description="Pooled connections to ALISE.")

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

    accounts: tuple[str, ...] = Field(min_length=1, description="Names and ranges: `[pool001..pool050]`.")

    @field_validator("accounts")
    @classmethod
    def _expand(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return expand_accounts(value)


class IdentitySettings(_Section):
    min_uid: int = Field(DEFAULT_MIN_UID, ge=1, description="Local accounts below this uid are refused.")
    slurm_user: str = Field(DEFAULT_SLURM_USER, description="The cluster's SlurmUser; never mapped to.")
    denied_users: tuple[str, ...] = Field(("root",), description="Accounts never mapped to (root always is).")
    require_local_account: bool = Field(
        False, description="Refuse accounts that do not exist in this host's user database."
    )
    alise: dict[str, AliseSettings] = Field(
        default_factory=dict, description="ALISE services by name, used by policy mapping steps `alise: NAME`."
    )
    pools: dict[str, PoolSettings] = Field(
        default_factory=dict, description="Account pools by name, used by policy mapping steps `pool: NAME`."
    )
    pool_database: ConfigPath | None = Field(
        None, description="SQLite file (WAL) holding the pools' leases; needed when pools are configured."
    )

    @model_validator(mode="after")
    def _pools_consistent(self) -> IdentitySettings:
        if self.pools and self.pool_database is None:
            raise ValueError("pools need pool_database (a SQLite file all workers share)")
        owner: dict[str, str] = {}
        for name, pool in self.pools.items():
            if not _ACCOUNT_NAME.fullmatch(name.lower()) or name != name.lower():
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
    paths: tuple[ConfigPath, ...] = Field(
        (Path("policies"),),
        validate_default=True,
        description="Policy files or directories of *.yaml files, read in name order.",
    )
    reload_interval_seconds: float = Field(
        DEFAULT_POLICY_RELOAD_INTERVAL_SECONDS,
        ge=0,
        le=3600,
        description="How often the policy files are checked for changes (0: only on SIGHUP). Defaults to 2.",
    )


class AuditSettings(_Section):
    sink: Literal["stdout", "file"] = Field("stdout", description="Where audit records go.")
    file: ConfigPath | None = Field(None, description="The audit file when sink is `file`.")
    max_bytes: int = Field(
        DEFAULT_AUDIT_MAX_BYTES,
        ge=0,
        description="Rotate the audit file before it grows past this size; 0 never rotates. Defaults to 100 MiB.",
    )
    keep: int = Field(0, ge=0, description="Rotated files kept (the oldest are deleted); 0 keeps all. Defaults to 0.")
    fail_closed: bool = Field(
        True, description="Refuse a request (503) whose record cannot be written. Defaults to true."
    )
    pseudonym_key_file: ConfigPath | None = Field(
        None, description="If set, subjects are recorded as a keyed hash (HMAC-SHA256) with the key in this file."
    )

    @model_validator(mode="after")
    def _file_for_file_sink(self) -> AuditSettings:
        if self.sink == "file" and self.file is None:
            raise ValueError("sink 'file' needs file")
        return self


class MetricsSettings(_Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics. Defaults to true.")
    path: str = Field("/metrics", pattern=r"^/[A-Za-z0-9/._\-]*$", description="Where. Defaults to /metrics.")
    multiprocess_dir: ConfigPath | None = Field(
        None,
        description="With several workers: an empty directory for prometheus-client's multiprocess files. "
        "Defaults to a fresh temporary directory.",
    )

    @field_validator("path")
    @classmethod
    def _outside_slurmrestd_paths(cls, value: str) -> str:
        first = value.strip("/").split("/")[0]
        if first in {"slurm", "slurmdb", "_slurmproxy", ""} or first.startswith("openapi"):
            raise ValueError(f"metrics path must not be / or under a slurmrestd or /_slurmproxy path, got {value!r}")
        return value


class ShieldCacheRule(_Section):
    path: str = Field(description="A path pattern, as in policy files (e.g. /slurm/{version}/jobs).")
    ttl_seconds: float = Field(gt=0, le=60, description="How long an answer may be served again.")

    @field_validator("path")
    @classmethod
    def _pattern(cls, value: str) -> str:
        from slurmproxy.policy.operations import compile_path

        compile_path(value)  # raises ValueError naming the problem
        return value


class ShieldSettings(_Section):
    coalesce: bool = Field(
        True, description="Concurrent identical GETs for one local account share one upstream request. Defaults to on."
    )
    cache: tuple[ShieldCacheRule, ...] = Field(
        (), description="Per-path short response cache, per local account. Defaults to none (off)."
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Larger answers are streamed, not shared. Defaults to 32 MiB."
    )
    max_entries: int = Field(4096, ge=1, description="Cached answers kept per worker. Defaults to 4096.")
    max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="All answer bodies the shield holds per worker (being shared, sent or cached); an answer "
        "that would pass it is streamed to its own request instead. Defaults to 256 MiB.",
    )


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(False, alias="json", description="Application logs as JSON lines.")


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
    shield: ShieldSettings = Field(default_factory=ShieldSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @model_validator(mode="after")
    def _discovery_user_is_safe(self) -> Settings:
        user = self.upstream.discovery_user
        if user in {"root", self.identity.slurm_user, *self.identity.denied_users}:
            raise ValueError(f"upstream.discovery_user must not be root, the SlurmUser or a denied account: {user!r}")
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


class ConfigError(ProxyError):
    """A configuration or policy file is invalid. The message names the file and every bad field."""


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
