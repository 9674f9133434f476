"""Identity mapping: a rule and a caller in, a safe local account out (or a refusal saying why).

Entry point: :meth:`IdentityMapper.map` (and :meth:`IdentityMapper.explain`, the same without side
effects). Inside: one module per backend (``table``, ``alise``, ``service``, ``pool``), the safety
``guard`` every answer passes, the ``mapper`` that tries a rule's steps in order, and ``backends``
to assemble them from the configuration.
"""

from slurmproxy.identity.backends import check_identity_config, check_policy_backends, open_identity
from slurmproxy.identity.guard import AccountGuard, LocalAccount
from slurmproxy.identity.mapper import IdentityMapper, StepReport

__all__ = [
    "AccountGuard",
    "IdentityMapper",
    "LocalAccount",
    "StepReport",
    "check_identity_config",
    "check_policy_backends",
    "open_identity",
]
