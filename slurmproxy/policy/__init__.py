"""Authorization policy: which federated callers may do what, and which local account they become."""

from slurmproxy.policy.loader import PolicyError, load_policy
from slurmproxy.policy.rules import Decision, MappingStep, Policy, Rule, evaluate

__all__ = ["Decision", "MappingStep", "Policy", "PolicyError", "Rule", "evaluate", "load_policy"]
