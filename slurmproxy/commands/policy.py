"""``slurmproxy policy check`` and ``slurmproxy policy explain``: the admin's tools for policy files.

* ``check [PATH…]`` validates policy files (those given, else ``policy.paths`` of ``--config``)
  exactly as the proxy loads them, prints every error with file, rule and field (exit 2), or a
  summary of the rules in evaluation order and any warnings (exit 0).
* ``explain --claims FILE --request "METHOD PATH" [--body FILE]`` prints the decision the proxy
  would make for a caller with these claims (a decoded token or a userinfo answer, as JSON or
  YAML): the entitlements considered, every rule and why it did or did not decide, the local
  account, and the body as it would be forwarded. Exit 0 if allowed, 1 if refused, 2 if the
  input, configuration or policy is invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from slurmproxy.commands import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, add_config_argument
from slurmproxy.commands.mapping import open_mapper
from slurmproxy.config.settings import IdentitySettings, IssuerSettings, Settings, load_settings
from slurmproxy.core.principal import Principal
from slurmproxy.errors import ConfigError, PolicyError, ProxyError
from slurmproxy.identity import check_policy_backends, open_identity
from slurmproxy.pipeline.explain import Explanation, explain
from slurmproxy.policy import Policy, load_policy
from slurmproxy.policy.ratelimit import describe as describe_limits
from slurmproxy.tokens import make_principal
from slurmproxy.tokens.checks import entitlements_from, subject_from
from slurmproxy.tokens.claims import Identity


class InputError(Exception):
    """A file or argument the admin gave is unusable."""


def _settings(args: argparse.Namespace) -> Settings | None:
    return load_settings(args.config) if args.config is not None else None


def _policy(args: argparse.Namespace, settings: Settings | None) -> Policy:
    paths = [Path(p) for p in args.paths] if args.paths else None
    if paths is None:
        if settings is None:
            raise InputError("give policy files or directories, or --config (or $SLURMPROXY_CONFIG)")
        paths = list(settings.policy.paths)
    if settings is None:
        return load_policy(paths)
    # As the proxy loads it: issuers must be configured, and so must the ALISE services and pools named.
    policy = load_policy(paths, trusted_issuers=[i.issuer for i in settings.oidc.issuers])
    check_policy_backends(policy, settings.identity)
    return policy


def _describe_rule(n: int, rule: Any, trusted: list[str] | None) -> list[str]:
    lines = [f"  {n}. {rule.id}  ({rule.source})"]
    if rule.description:
        lines.append(f"       {rule.description}")
    who = [str(r) for r in rule.requirements]
    if rule.issuers is not None:
        lines.append(f"       issuers: {', '.join(sorted(rule.issuers))}")
    elif trusted is not None:
        lines.append(f"       issuers: {', '.join(trusted)} (the configured issuer: the rule names none)")
    else:
        lines.append("       issuers: any configured issuer (the rule names none)")
    if rule.subjects is not None:
        lines.append(f"       subjects: {', '.join(sorted(rule.subjects))}")
    for name, values in rule.claims.items():
        lines.append(f"       claim {name}: one of {', '.join(repr(v) for v in values)}")
    if who:
        lines.append(f"       entitlements (any of): {'; '.join(who)}")
    lines.append(f"       allows: {', '.join(rule.groups)}")
    lines.append(f"       mapping: {' -> '.join(str(m) for m in rule.mapping)}")
    if rule.job is not None:
        lines.append(f"       job: {json.dumps(rule.job.describe())}")
    if rule.rate_limit is not None:
        lines.append(f"       rate limit: {describe_limits(rule.rate_limit)}")
    return lines


def check(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        policy = _policy(args, settings)
    except (ConfigError, PolicyError) as exc:
        print(f"slurmproxy: policy invalid\n{exc.detail}", file=sys.stderr)
        return EXIT_CONFIG
    except InputError as exc:
        print(f"slurmproxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"policy OK: {len(policy.rules)} rule(s), digest {policy.digest}; files read: {', '.join(policy.inputs)}")
    if settings is None:
        print("note: without --config, the issuers the rules name were not checked against the configuration")
    print("rules, in evaluation order (the first that admits the caller and allows the operation decides):")
    trusted = [i.issuer for i in settings.oidc.issuers] if settings is not None else None
    for n, rule in enumerate(policy.rules, start=1):
        print("\n".join(_describe_rule(n, rule, trusted)))
    for warning in policy.warnings:
        print(f"warning: {warning}")
    return EXIT_OK


def _read_data(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read the {what} {path}: {exc.strerror}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"the {what} {path} is not JSON or YAML: {exc}") from exc


def _principal_input(args: argparse.Namespace, settings: Settings | None) -> tuple[Any, IssuerSettings]:
    claims = _read_data(args.claims, "claims file")
    if not isinstance(claims, dict) or not isinstance(claims.get("iss"), str):
        raise InputError(f"the claims file {args.claims} must be an object with an `iss` claim")
    if settings is None:
        return claims, IssuerSettings(issuer=claims["iss"])
    for issuer in settings.oidc.issuers:
        if issuer.issuer == claims["iss"]:
            return claims, issuer
    raise InputError(f"issuer {claims['iss']!r} is not configured: every token from it is refused (401)")


def principal_from(issuer: IssuerSettings, claims: dict[str, Any]) -> Principal:
    """The caller as the proxy would see them if the token (or userinfo) carried these claims."""
    subject = subject_from(claims, issuer.subject_claim, "claims file")
    identity = Identity(subject, entitlements_from(claims, issuer.entitlement_claims), None, None)
    return make_principal(issuer, claims, identity, "explain")


def _request(args: argparse.Namespace) -> tuple[str, str, bytes | None]:
    method, _, path = args.request.strip().partition(" ")
    if not path.strip():
        raise InputError('--request must be "METHOD PATH", e.g. "POST /slurm/v0.0.42/job/submit"')
    body = None
    if args.body is not None:
        try:
            body = args.body.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read the body {args.body}: {exc.strerror}") from exc
    return method.upper(), path.strip().split("?", 1)[0], body


def render(result: Explanation) -> str:
    out = [f"request:  {result.method} {result.path}", f"caller:   {result.subject} from {result.issuer}"]
    out.append(f"entitlements considered ({len(result.entitlements)}):")
    out.extend(f"  {e}" for e in result.entitlements)
    if result.other_entitlements or result.malformed_entitlements:
        other, malformed = result.other_entitlements, result.malformed_entitlements
        out.append(f"  (ignored: {other} not group entitlements, {malformed} malformed)")
    out.append("rules, in evaluation order:")
    for n, step in enumerate(result.steps, start=1):
        out.append(f"  {n}. {step.rule_id}  ({step.source})")
        out.append(f"       {'admits' if step.admits else 'does not admit'}: {step.why}")
        if step.body is not None:
            out.append(f"       job body: {step.body}")
        if step.decides:
            out.append("       => decides")
    verdict = f"ALLOW by rule {result.rule} ({result.operation})" if result.allowed else "DENY"
    out.append(f"decision: {verdict}: HTTP {result.status} {result.reason}: {result.detail}")
    if result.account is not None:
        out.append(f"account:  {result.account} (via {result.mapping})")
    for report in result.mapping_steps:
        what = "chosen" if report["chosen"] else report["error"] or report["note"]
        out.append(f"  mapping {report['step']}: {report['answer'] or '-'} ({what})")
    out.extend(f"note:     {note}" for note in result.notes)
    if result.body is not None:
        out.append("body as forwarded to slurmrestd:")
        out.append(json.dumps(result.body, indent=2))
    return "\n".join(out)


def explain_command(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        policy = _policy(args, settings)
        claims, issuer = _principal_input(args, settings)
        principal = principal_from(issuer, claims)
        method, path, body = _request(args)
    except (ConfigError, PolicyError) as exc:
        print(f"slurmproxy: invalid configuration or policy\n{exc.detail}", file=sys.stderr)
        return EXIT_CONFIG
    except ProxyError as exc:  # e.g. no subject claim
        print(f"slurmproxy: the claims would be refused: {exc.detail} ({exc.reason})", file=sys.stderr)
        return EXIT_CONFIG
    except InputError as exc:
        print(f"slurmproxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    result = asyncio.run(_explain(settings, policy, principal, method, path, body))
    print(json.dumps(result.as_dict(), indent=2) if args.json else render(result))
    return EXIT_OK if result.allowed else EXIT_FAILURE


async def _explain(
    settings: Settings | None, policy: Policy, principal: Principal, method: str, path: str, body: bytes | None
) -> Explanation:
    """With a configuration, the mapping backends it configures (ALISE is asked live; pools lease nothing)."""
    if settings is None:
        async with open_identity(IdentitySettings()) as mapper:
            return await explain(policy, principal, method, path, body, mapper)
    async with open_mapper(settings) as mapper:
        return await explain(policy, principal, method, path, body, mapper)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("policy", help="check policy files; explain a decision")
    actions = parser.add_subparsers(dest="policy_command", required=True)
    check_parser = actions.add_parser("check", help="validate policy files and list their rules")
    check_parser.add_argument("paths", nargs="*", help="policy files or directories (default: policy.paths)")
    add_config_argument(check_parser)
    check_parser.set_defaults(run=check)
    explain_parser = actions.add_parser("explain", help="show how the policy decides a request, step by step")
    explain_parser.add_argument("--claims", type=Path, required=True, help="the caller's claims (JSON or YAML)")
    explain_parser.add_argument("--request", required=True, help='"METHOD PATH", e.g. "GET /slurm/v0.0.42/jobs"')
    explain_parser.add_argument("--body", type=Path, help="the request body (job submissions and updates)")
    explain_parser.add_argument("--policy", dest="paths", action="append", help="policy file or directory")
    explain_parser.add_argument("--json", action="store_true", help="print the explanation as JSON")
    add_config_argument(explain_parser)
    explain_parser.set_defaults(run=explain_command)
