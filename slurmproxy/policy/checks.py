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


def check_rule_issuers(
    spec: RuleSpec, issuers: list[str] | None, where: str, trusted: set[str] | None, errors: list[str]
) -> None:
    """A rule must say whose tokens it admits when that is not obvious (issue 15, item 2).

    A subject is unique only per issuer, so a rule that lists subjects always names its issuers; and
    with more than one issuer configured every rule does, or a second issuer (a test instance, a site
    IdP) could assert the entitlements or the subject the rule was written for.
    """
    if issuers is not None:
        return
    if spec.subjects is not None:
        errors.append(
            f"{where}: lists subjects but names no issuers; a subject is unique only per issuer: add `issuers:` "
            "to the rule (or to its file)"
        )
    elif trusted is not None and len(trusted) > 1:
        errors.append(
            f"{where}: names no issuers, but {len(trusted)} issuers are configured ({', '.join(sorted(trusted))}); "
            "say which of them may assert this rule's entitlements: add `issuers:` to the rule (or to its file)"
        )


def _communities(rule: Rule) -> set[str]:
    """Who a rule admits, coarsely: its VOs (AARC groups), or for a subject-only rule its subjects."""
    if rule.requirements:
        return {
            f"VO {r.group}" if r.namespace == "urn:mace:egi.eu" else f"VO {r.namespace}:{r.group}"
            for r in rule.requirements
        }
    return {f"subjects {', '.join(sorted(rule.subjects or ()))}"}


def shared_account_warnings(rules: Iterable[Rule], trusted: set[str] | None) -> list[str]:
    """One warning per service account that rules of different VOs, subjects or issuers map to.

    Everyone mapped to one account is one Unix user to Slurm: they share every "-own" operation
    (cancel-own, update-own) on each other's jobs and every file the account can reach. Within one VO
    that may be the intent; across VOs or issuers it hands one community another's account.
    """
    by_account: dict[str, list[Rule]] = {}
    for rule in rules:
        for step in rule.mapping:
            if step.kind == "service_account" and rule not in by_account.setdefault(step.target, []):
                by_account[step.target].append(rule)
    any_issuer = sorted(trusted) if trusted else ["any configured issuer"]
    warnings: list[str] = []
    for account, sharing in by_account.items():
        communities: dict[str, list[str]] = {}
        issuers: dict[str, list[str]] = {}
        for rule in sharing:
            for community in _communities(rule):
                communities.setdefault(community, []).append(rule.id)
            for issuer in sorted(rule.issuers) if rule.issuers is not None else any_issuer:
                issuers.setdefault(issuer, []).append(rule.id)
        problems = []
        if len(communities) > 1:
            problems.append(
                "rules of different VOs or subjects: "
                + "; ".join(f"{c}: {', '.join(ids)}" for c, ids in sorted(communities.items()))
            )
        if len(issuers) > 1:
            problems.append(
                "rules admitting different issuers: "
                + "; ".join(f"{i}: {', '.join(ids)}" for i, ids in sorted(issuers.items()))
            )
        if problems:
            warnings.append(
                f"local account {account} is reachable from {' and from '.join(problems)}. Everyone mapped to it "
                "shares every -own operation (cancel, update) on the others' jobs and the account's files; give "
                "each VO (and issuer) its own account"
            )
    return warnings


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
