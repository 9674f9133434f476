"""Policy checks beyond the file format: issuers, job sections, warnings, and the policy's digest."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from slurmproxy.policy.jobs.fields import FORBIDDEN_FIELDS, KNOWN_FIELDS
from slurmproxy.policy.limits import JobLimits, compile_limits
from slurmproxy.policy.model import PolicyFile, RuleSpec
from slurmproxy.policy.rules import Rule


def compile_job(spec: RuleSpec, where: str, errors: list[str]) -> JobLimits | None:
    if spec.job is None:
        return None
    limits, problems = compile_limits(spec.job, FORBIDDEN_FIELDS, KNOWN_FIELDS)
    errors.extend(f"{where}.job.{problem}" for problem in problems)
    return limits


def check_issuers(file: Path, pf: PolicyFile, indexes: list[int], trusted: set[str] | None, errors: list[str]) -> None:
    """Every issuer a file or rule names must be configured; a rule may only narrow its file's list."""
    for n, iss in enumerate(pf.issuers or []):
        if trusted is not None and iss not in trusted:
            errors.append(f"{file}: issuers[{n}]: {iss!r} is not a configured issuer")
    for index, spec in zip(indexes, pf.rules, strict=True):
        for n, iss in enumerate(spec.issuers or []):
            where = f"{file}: rules[{index}] (id={spec.id}).issuers[{n}]"
            if trusted is not None and iss not in trusted:
                errors.append(f"{where}: {iss!r} is not a configured issuer")
            elif pf.issuers is not None and iss not in pf.issuers:
                errors.append(f"{where}: {iss!r} is not among the file's issuers")


def warnings_for(rule: Rule) -> list[str]:
    """Legal but probably unintended: said by `policy check`, never an error."""
    where = f"{rule.source}: rule {rule.id}"
    job_ops = {op.group for op in rule.operations if op.matches("POST", "/slurm/v0.0.42/job/submit")}
    if not job_ops:
        return []
    if rule.job is None:
        return [f"{where}: allows job submission without a `job:` section (account, partition, QOS unrestricted)"]
    if rule.job.accounts is None:
        return [f"{where}: job.accounts is not restricted (without slurmdbd, Slurm accepts any account name)"]
    return []


def digest_of(files: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        try:
            digest.update(file.read_bytes())
        except OSError:
            digest.update(b"\0missing\0")
    return digest.hexdigest()[:16]
