"""The proxy's error hierarchy.

Every refusal the proxy makes is one of these exceptions. Each carries an HTTP status, a
machine-readable ``reason`` (stable; it appears in response bodies, audit records and metrics)
and a human-readable ``detail`` that never contains a token or a secret::

    ProxyError
    ├── BadRequestError (400)          malformed path, header, or body
    ├── AuthenticationError (401)      which token check failed
    ├── AuthorizationError (403)       which rule (or none) denied the request
    ├── IdentityMappingError (403)     why no safe local account could be chosen
    ├── NotFoundError (404)            not a path the proxy serves
    ├── RequestTimeoutError (408)      the client was too slow sending headers or body
    ├── PayloadTooLargeError (413)
    ├── UnsupportedMediaTypeError (415)
    ├── RateLimitedError (429)
    ├── HeadersTooLargeError (431)
    ├── DependencyError (503)          an identity provider or mapping service failed
    ├── UpstreamError (502)            slurmrestd unreachable or broken
    └── UpstreamTimeoutError (504)
"""

from __future__ import annotations

from typing import Any, ClassVar


class ProxyError(Exception):
    status_code: ClassVar[int] = 500
    default_reason: ClassVar[str] = "internal_error"

    def __init__(self, detail: str, *, reason: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason or self.default_reason
        self.headers = dict(headers or {})
        self.fields: dict[str, Any] = {}  # extra public fields for the response's "slurmproxy" object

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status_code}, reason={self.reason!r}, detail={self.detail!r})"


class BadRequestError(ProxyError):
    status_code = 400
    default_reason = "bad_request"


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


class IdentityMappingError(ProxyError):
    status_code = 403
    default_reason = "unmapped"


class NotFoundError(ProxyError):
    status_code = 404
    default_reason = "not_found"


class MethodNotAllowedError(ProxyError):
    status_code = 405
    default_reason = "method_not_allowed"


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


class HeadersTooLargeError(ProxyError):
    status_code = 431
    default_reason = "header_too_large"


class UpstreamError(ProxyError):
    status_code = 502
    default_reason = "upstream_unreachable"


class DependencyError(ProxyError):
    """A service the decision depends on (provider, ALISE, audit sink) failed: fail closed."""

    status_code = 503
    default_reason = "dependency_unavailable"


class UpstreamTimeoutError(ProxyError):
    status_code = 504
    default_reason = "upstream_timeout"
