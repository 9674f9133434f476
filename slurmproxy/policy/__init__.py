"""Authorization policy: which federated callers may do what, and by which rule.

In: a :class:`~slurmproxy.core.principal.Principal`, the method and canonical path, and for job
requests the body. Out: :class:`Authorized` (the deciding rule, its operation and entitlement, and the
job body as it goes to slurmrestd) or a refusal (403 naming the rule or field, 400/413/415 for job
bodies, 429 for a rate limit).

Entry point: :meth:`Authorizer.authorize`. Inside: ``model`` (the file format), ``loader`` and
``checks`` (loading with every error named), ``rules`` (the compiled policy and its pure
evaluation), ``operations`` (operation groups), ``limits`` and ``jobs/`` (job-body constraints),
``ratelimit`` (per-rule token buckets), ``reload`` (live reload).
"""

from slurmproxy.policy.authorize import Authorized, Authorizer, PolicyRequest
from slurmproxy.policy.loader import load_policy
from slurmproxy.policy.rules import Decision, MappingStep, Policy, Rule, evaluate

__all__ = [
    "Authorized",
    "Authorizer",
    "Decision",
    "MappingStep",
    "Policy",
    "PolicyRequest",
    "Rule",
    "evaluate",
    "load_policy",
]
