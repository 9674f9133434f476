"""Identity mapping: which local account a federated identity becomes, and the checks on it.

One module per backend (``table``, ``alise``, ``service``, ``pool``), the safety ``guard`` every
answer passes, the ``mapper`` that tries a rule's steps in order, and ``backends`` to assemble them.
"""

from slurmproxy.identity.backends import check_identity_config, check_policy_backends, open_identity
from slurmproxy.identity.guard import POSIX_NAME, AccountGuard, LocalAccount
from slurmproxy.identity.mapper import IdentityMapper, StepReport

__all__ = [
    "POSIX_NAME",
    "AccountGuard",
    "IdentityMapper",
    "LocalAccount",
    "StepReport",
    "check_identity_config",
    "check_policy_backends",
    "open_identity",
]
