"""Every exception slurmproxy raises, under one base.

Each carries an HTTP status, a machine-readable ``reason`` (stable: it appears in response bodies,
audit records and metrics) and a human-readable ``detail`` that never contains a token or a secret.
Refusals of a request and errors at start-up share the base, so the command line, the pipeline and
the tests catch them the same way::

    ProxyError (500)
    ├── BadRequestError (400)             malformed path, header, or body
    │   └── JobBodyError                  a job body that is not JSON or not the shape of its version
    ├── AuthenticationError (401)         which token check failed
    │   └── MissingTokenError
    ├── AuthorizationError (403)          which rule (or none) denied the request
    │   └── JobPolicyError                a job body asks for what its rule does not allow
    ├── IdentityMappingError (403)        why no safe local account could be chosen
    ├── NotFoundError (404)               not a path the proxy serves
    │   └── ApiVersionNotServedError      an API version slurmrestd does not serve
    ├── RequestTimeoutError (408)         the client was too slow sending headers or body
    ├── PayloadTooLargeError (413)
    ├── UnsupportedMediaTypeError (415)
    ├── RateLimitedError (429)            a rule's rate limit, or a pool's admission rate for new leases
    │   └── ConcurrencyLimitedError       one identity holds its share of slurmrestd's connections
    ├── HeadersTooLargeError (431)
    ├── UpstreamError (502)               slurmrestd unreachable, broken, or it refused the proxy's credential
    │   ├── UpstreamConnectError          the connection could not be made
    │   │   └── UpstreamClosed            slurmrestd closed it, or did not speak HTTP/1.1
    │   └── UpstreamAuthFailed            Slurm rejected the proxy's own credential
    ├── DependencyError (503)             a provider, ALISE, the lease database or the audit log failed
    │   ├── AliseOutage
    │   ├── PoolExhausted, PoolUnavailable, PoolCapReached
    │   ├── AuditWriteError
    │   └── StateUnavailable              the shared state (Redis, PostgreSQL) failed and the admin chose to refuse
    ├── UpstreamTimeoutError (504)
    │   ├── UpstreamReadTimeout
    │   └── UpstreamBusy                  every pooled connection to slurmrestd is in use
    ├── ConfigError                       configuration invalid (start-up, ``check-config``)
    │   ├── PolicyError                   policy files invalid (``errors`` lists every problem)
    │   └── CredentialError               the Slurm key or service token cannot be used
    └── ClientTooSlow                     the client stopped reading an answer (the server closes it)

A refusal raised after a stage already decided something carries it for the audit record:
``rule`` (the rule that allowed the operation, when a job body or a rate limit then refused) and
``upstream_status`` (slurmrestd's status, when the proxy refused slurmrestd's answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class RuleRef:
    """The rule, operation group and entitlement of a policy decision, as the audit record names them."""

    rule: str
    operation: str
    entitlement: str | None = None


class ProxyError(Exception):
    status_code: ClassVar[int] = 500
    default_reason: ClassVar[str] = "internal_error"

    def __init__(self, detail: str, *, reason: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason or self.default_reason
        self.headers = dict(headers or {})
        self.fields: dict[str, Any] = {}  # extra public fields for the response's "slurmproxy" object
        self.rule: RuleRef | None = None
        self.upstream_status: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status_code}, reason={self.reason!r}, detail={self.detail!r})"


class BadRequestError(ProxyError):
    status_code = 400
    default_reason = "bad_request"


class JobBodyError(BadRequestError):
    """The body is not JSON, or not the shape slurmrestd takes for this request (400)."""

    default_reason = "bad_job_body"


class AuthenticationError(ProxyError):
    """RFC 6750 §3.1: a missing, malformed, expired or otherwise invalid access token."""

    status_code = 401
    default_reason = "invalid_token"

    def __init__(self, detail: str, *, reason: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail, reason=reason, headers=headers)
        # RFC 6750 §3: the error code is "invalid_token"; the description must not echo the token.
        description = detail.replace("\\", "").replace('"', "'")
        self.headers.setdefault("WWW-Authenticate", f'Bearer error="invalid_token", error_description="{description}"')


class MissingTokenError(AuthenticationError):
    """RFC 6750 §3.1: no credentials at all get a bare challenge without an error code."""

    default_reason = "missing_token"

    def __init__(self, detail: str = "no bearer token in the Authorization header") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="slurmproxy"'})


class AuthorizationError(ProxyError):
    status_code = 403
    default_reason = "no_rule_allows"


class JobPolicyError(AuthorizationError):
    """The body asks for something the policy does not allow (403). ``field`` names it, e.g. ``job.partition``;
    ``rule_id`` the rule whose constraint refused it."""

    default_reason = "job_field_not_allowed"

    def __init__(self, field: str, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail, reason=reason)
        self.field = field
        self.rule_id: str | None = None
        if field:
            self.fields["field"] = field


class IdentityMappingError(ProxyError):
    status_code = 403
    default_reason = "unmapped"


class NotFoundError(ProxyError):
    status_code = 404
    default_reason = "not_found"


class ApiVersionNotServedError(NotFoundError):
    """``served`` maps each API (``slurm``, ``slurmdb``) to the versions slurmrestd serves."""

    default_reason = "api_version_not_served"

    def __init__(self, api: str, version: str, served: dict[str, list[str]]) -> None:
        versions = served.get(api, [])
        if versions:
            detail = f"slurmrestd does not serve /{api}/{version}/; it serves /{api}/ {', '.join(versions)}"
        else:
            offered = "; ".join(f"/{a}/ {', '.join(v)}" for a, v in served.items())
            detail = f"slurmrestd serves no /{api}/ API; it serves {offered}"
        super().__init__(detail)
        self.fields["api_versions"] = served


class RequestTimeoutError(ProxyError):
    status_code = 408
    default_reason = "request_timeout"


class PayloadTooLargeError(ProxyError):
    status_code = 413
    default_reason = "body_too_large"


class UnsupportedMediaTypeError(ProxyError):
    status_code = 415
    default_reason = "unsupported_media_type"


class RateLimitedError(ProxyError):
    status_code = 429
    default_reason = "rate_limited"


class ConcurrencyLimitedError(RateLimitedError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"you already have {limit} requests in progress at slurmrestd (upstream.max_connections_per_identity); "
            "wait for one to finish",
            reason="too_many_concurrent_requests",
            headers={"Retry-After": "1"},
        )


class HeadersTooLargeError(ProxyError):
    status_code = 431
    default_reason = "header_too_large"


class UpstreamError(ProxyError):
    status_code = 502
    default_reason = "upstream_unreachable"


class UpstreamConnectError(UpstreamError):
    """slurmrestd could not be reached. ``cause`` says what happened (for logs and tests); ``detail`` is
    the public message."""

    def __init__(self, cause: str, *, detail: str = "slurmrestd is unreachable or closed the connection") -> None:
        super().__init__(detail, reason="upstream_unreachable")
        self.cause = cause


class UpstreamClosed(UpstreamConnectError):
    """slurmrestd closed the connection, or sent something that is not HTTP/1.1."""


class UpstreamAuthFailed(UpstreamError):
    default_reason = "upstream_auth_failed"


class DependencyError(ProxyError):
    """A service the decision depends on (provider, ALISE, audit sink) failed: fail closed."""

    status_code = 503
    default_reason = "dependency_unavailable"


class AliseOutage(DependencyError):
    """ALISE did not answer usably (timeout, connection, HTTP or payload error, a rejected key)."""


class PoolExhausted(DependencyError):
    default_reason = "pool_exhausted"


class PoolUnavailable(DependencyError):
    default_reason = "pool_unavailable"


class PoolCapReached(DependencyError):
    """The rule that admitted the caller already holds as many leases of the pool as its step allows."""

    default_reason = "pool_rule_cap"


class AuditWriteError(DependencyError):
    default_reason = "audit_unavailable"


class StateUnavailable(DependencyError):
    """Redis or PostgreSQL did not answer (in time); the backend that was asked is named in ``detail``."""

    default_reason = "state_unavailable"


class UpstreamTimeoutError(ProxyError):
    status_code = 504
    default_reason = "upstream_timeout"


class UpstreamReadTimeout(UpstreamTimeoutError):
    def __init__(self, detail: str = "slurmrestd did not answer in time") -> None:
        super().__init__(detail, reason="upstream_timeout")


class UpstreamBusy(UpstreamTimeoutError):
    def __init__(self, detail: str = "every connection to slurmrestd is busy") -> None:
        super().__init__(detail, reason="upstream_busy")


class ConfigError(ProxyError):
    """A configuration or policy file is invalid. The message names the file and every bad field."""

    default_reason = "config_invalid"


class PolicyError(ConfigError):
    """One or more policy files are invalid. ``errors`` lists every problem found."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors), reason="policy_invalid")
        self.errors = list(errors)


class CredentialError(ConfigError):
    """The Slurm JWT key or the SlurmUser token file cannot be used."""

    default_reason = "credential_invalid"


class ClientTooSlow(ProxyError):
    """The client stopped reading the answer; the server closes the connection."""

    default_reason = "client_too_slow"
