"""Audit: one record per request, allowed or denied: who, as whom, what, by which rule, the outcome.

In: what the stages returned (principal, decision, account, slurmrestd's answer) or the refusal.
Out: one JSON line in the audit log (``record``: the record and its encoding; ``log``: the sinks and
:class:`AuditTrail`, the one place a record is finished; ``file``: the rotating file sink), and for
auditors the reader behind ``slurmproxy audit`` (``query``). Never a token or a secret.
"""

from slurmproxy.audit.log import AuditLog, AuditTrail
from slurmproxy.audit.record import SCHEMA, AuditRecord

__all__ = ["SCHEMA", "AuditLog", "AuditRecord", "AuditTrail"]
