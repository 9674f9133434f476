"""Token validation: an ``Authorization`` header in, a trusted :class:`~slurmproxy.core.principal.Principal`
out, or an :class:`~slurmproxy.errors.AuthenticationError` (401) saying which check failed, or a
:class:`~slurmproxy.errors.DependencyError` (503) when the provider failed.

Entry point: :meth:`TokenValidator.authenticate`. Inside: ``bearer`` (the header and the token's
shape), ``checks`` (claim checks, pure), ``provider`` (discovery and keys of one configured issuer),
``claims`` (userinfo and introspection), ``validator`` (the order of checks and the cache).
"""

from slurmproxy.tokens.validator import TokenValidator, build_validator, make_principal

__all__ = ["TokenValidator", "build_validator", "make_principal"]
