"""Mapping tables: admin-kept (issuer, subject) → local user, loaded and reloaded with the policy.

Tables are read by the policy loader (YAML ``entries:`` or CSV ``issuer,subject,user``, from files
named by the policy or inline) into :attr:`Policy.tables`; a lookup is exact on both issuer and
subject, so the same subject from two issuers never collides.
"""

from __future__ import annotations

from slurmproxy.policy.rules import Policy


def table_lookup(policy: Policy, table: str, issuer: str, subject: str) -> str | None:
    return policy.tables.get(table, {}).get((issuer, subject))
