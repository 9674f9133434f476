"""``slurmproxy mapping``: who a federated identity becomes, and the pool leases.

* ``mapping show --issuer I --subject S [--rule ID] [--json]``: for each rule that could admit the
  identity (by its ``issuers`` and ``subjects``; entitlements are not known here), every mapping
  step's answer, asked live (ALISE included), and which one a request would use. Nothing changes:
  a pool step shows the lease the identity has, or the account it would lease.
* ``mapping leases [list] [--pool P] [--json]``: the leases, oldest use last.
* ``mapping leases release (--account A | --issuer I --subject S | --pool P --all)``: end leases now.
* ``mapping leases expire --unused-for 30d [--pool P] [--dry-run]``: end leases not used for that long.
* ``mapping leases migrate --from FILE [--dry-run]``: copy the leases of a SQLite lease file into
  PostgreSQL (``state.backend: shared``), once, when a site moves to several replicas; leases the
  database already has win, and each one not copied is listed with the reason.

The leases are those of the configured backend: the SQLite file ``identity.pool_database``, or
PostgreSQL with ``state.backend: shared``. Released, expired and migrated leases are written to
the audit log (when ``audit.sink`` is ``file``) as records with ``method: "ADMIN"``. A released
account goes back to its pool: files the previous holder left in it stay there, so clean it before
it is leased again if that matters at your site.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slurmproxy.audit import AuditLog, AuditRecord
from slurmproxy.commands import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, add_config_argument
from slurmproxy.config.settings import Settings, load_settings
from slurmproxy.core.durations import parse_duration
from slurmproxy.core.principal import Principal
from slurmproxy.errors import AuditWriteError, ConfigError, PolicyError, ProxyError
from slurmproxy.identity import IdentityMapper, open_identity
from slurmproxy.identity.backends import open_lease_store, pool_accounts, pool_limits
from slurmproxy.identity.pool import Lease, LeaseStore, read_leases
from slurmproxy.pipeline.runtime import load_runtime_policy
from slurmproxy.policy import Rule
from slurmproxy.state import open_mapping_state, open_postgres

if TYPE_CHECKING:
    from slurmproxy.state.leases import SharedLeases


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _settings(args: argparse.Namespace) -> Settings | None:
    try:
        return load_settings(args.config)
    except ConfigError as exc:
        print(f"slurmproxy: invalid configuration\n{exc.detail}", file=sys.stderr)
        return None


def _candidate_rules(rules: tuple[Rule, ...], issuer: str, subject: str, only: str | None) -> list[Rule]:
    return [
        r
        for r in rules
        if (only is None or r.id == only)
        and (r.issuers is None or issuer in r.issuers)
        and (r.subjects is None or subject in r.subjects)
    ]


async def _show(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    policy = load_runtime_policy(settings)
    principal = Principal(
        issuer=args.issuer, subject=args.subject, claims={}, entitlements=(), expires_at=0, token_id=""
    )
    out: dict[str, Any] = {"issuer": args.issuer, "subject": args.subject, "rules": []}
    async with open_mapper(settings) as mapper:
        for rule in _candidate_rules(policy.rules, args.issuer, args.subject, args.rule):
            steps = await mapper.explain(policy, rule, principal)
            out["rules"].append({"rule": rule.id, "source": rule.source, "steps": [asdict(s) for s in steps]})
    return out


@asynccontextmanager
async def open_mapper(settings: Settings) -> AsyncIterator[IdentityMapper]:
    """The mapper with the configured backends: with ``state.backend: shared``, the leases in PostgreSQL."""
    async with (
        open_mapping_state(settings) as state,
        open_identity(settings.identity, leases=state.leases, last_known=state.last_known) as mapper,
    ):
        yield mapper


def _print_show(result: dict[str, Any]) -> None:
    print(f"identity: issuer={result['issuer']} subject={result['subject']}")
    if not result["rules"]:
        print("  no rule can admit this identity (by issuer and subject)")
    for rule in result["rules"]:
        print(f"rule {rule['rule']} ({rule['source']}):")
        for step in rule["steps"]:
            if step["error"]:
                text = f"REFUSED {step['answer'] or ''} {step['error']}".replace("  ", " ")
            elif step["answer"] is not None:
                text = f"{step['answer']}{'  <- used' if step['chosen'] else ''} ({step['note']})"
            else:
                text = step["note"]
            extra = f"  {json.dumps(step['detail'], sort_keys=True)}" if step["detail"] else ""
            print(f"  {step['step']:<32} {text}{extra}")


def show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return EXIT_CONFIG
    try:
        result = asyncio.run(_show(settings, args))
    except (ConfigError, PolicyError) as exc:
        print(f"slurmproxy: invalid configuration\n{exc.detail}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_show(result)
    return EXIT_OK


def _audit_admin(settings: Settings, leases: list[Lease], reason: str, command: str) -> str | None:
    """One audit record per ended lease; returns a warning if they could not be written."""
    if settings.audit.sink != "file":
        return "audit.sink is not 'file': the release is not in the audit log"
    log = AuditLog(settings.audit)
    try:
        log.open()
        for lease in leases:
            record = AuditRecord.begin(
                f"admin-{uuid.uuid4().hex[:16]}",
                "ADMIN",
                command,
                client="cli",
                user_agent=f"slurmproxy mapping (uid {os.getuid()})",
            )
            record.issuer, record.subject = lease.issuer, lease.subject
            record.mapping, record.local_user = f"pool:{lease.pool}", lease.account
            record.mapping_detail = {"lease": reason, **lease.as_dict()}
            record.allow(200)
            record.reason = f"lease_{reason}"
            log.emit(record)
    except (OSError, AuditWriteError) as exc:
        return f"could not write the audit log: {exc}"
    finally:
        log.close()
    return None


def _print_leases(leases: list[Lease], as_json: bool, verb: str = "") -> None:
    if as_json:
        print(json.dumps([lease.as_dict() for lease in leases], indent=2))
        return
    for lease in leases:
        d = lease.as_dict()
        print(
            f"{verb}{d['pool']:<16} {d['account']:<16} {d['issuer']} {d['subject']}  since {d['leased_at']}"
            f"  last used {d['last_used']}"
        )


class _FileLeases:
    """The SQLite store with the shared store's (async) admin methods."""

    def __init__(self, store: LeaseStore) -> None:
        self.store = store

    async def leases(self, pool: str | None = None) -> list[Lease]:
        return self.store.leases(pool)

    async def free(self, pool: str) -> list[str]:
        return self.store.free(pool)

    async def release(self, **conditions: Any) -> list[Lease]:
        return self.store.release(**conditions)


ADMIN_TIMEOUT_SECONDS = 60.0  # an administrator's command may wait longer on PostgreSQL than a request


@asynccontextmanager
async def _lease_admin(settings: Settings) -> AsyncIterator[Any]:
    if settings.state.backend == "shared":
        from slurmproxy.state.leases import SharedLeases  # psycopg: only for the shared backend

        async with open_postgres(settings) as db:
            db.guard.timeout = max(db.guard.timeout, ADMIN_TIMEOUT_SECONDS)
            yield SharedLeases(db, pool_accounts(settings.identity), limits=pool_limits(settings.identity))
        return
    store = open_lease_store(settings.identity)
    assert store is not None
    try:
        yield _FileLeases(store)
    finally:
        store.close()


def leases(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings is None:
        return EXIT_CONFIG
    shared = settings.state.backend == "shared"
    if not shared and settings.identity.pool_database is None:
        print("slurmproxy: no identity.pool_database in the configuration", file=sys.stderr)
        return EXIT_CONFIG
    if shared and settings.state.postgres is None:
        print("slurmproxy: state.backend is shared but state.postgres is not configured", file=sys.stderr)
        return EXIT_CONFIG
    if getattr(args, "pool", None) and args.pool not in settings.identity.pools:
        print(f"slurmproxy: no pool {args.pool!r} (configured: {', '.join(settings.identity.pools)})", file=sys.stderr)
        return EXIT_CONFIG
    action = getattr(args, "action", None) or "list"
    if action == "migrate" and not shared:
        print("slurmproxy: migrate copies leases into PostgreSQL: set state.backend: shared first", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return asyncio.run(_leases(settings, args, action))
    except (ProxyError, OSError) as exc:
        print(f"slurmproxy: {getattr(exc, 'detail', exc)}", file=sys.stderr)
        return EXIT_FAILURE


async def _leases(settings: Settings, args: argparse.Namespace, action: str) -> int:
    async with _lease_admin(settings) as store:
        if action == "list":
            found = await store.leases(args.pool)
            _print_leases(found, args.json)
            if not args.json:
                for name, pool in settings.identity.pools.items():
                    if args.pool in (None, name):
                        leased = len(pool.accounts) - len(await store.free(name))
                        print(f"pool {name}: {leased} of {len(pool.accounts)} leased")
            return EXIT_OK
        if action == "migrate":
            return await _migrate(settings, store, args)
        return await _end_leases(settings, store, args, action)


async def _migrate(settings: Settings, store: SharedLeases, args: argparse.Namespace) -> int:
    found = read_leases(args.source)
    pools = settings.identity.pools
    wanted = [lease for lease in found if lease.pool in pools and lease.account in pools[lease.pool].accounts]
    skipped = [(lease, "its account is not in a configured pool") for lease in found if lease not in wanted]
    if args.dry_run:
        copied: list[Lease] = wanted
    else:
        copied, refused = await store.copy_in(wanted)
        skipped += refused
    verb = "would copy " if args.dry_run else "copied "
    _print_leases(copied, args.json, verb)
    if not args.json:
        for lease, why in skipped:
            print(f"skipped {lease.pool:<16} {lease.account:<16} {lease.issuer} {lease.subject}: {why}")
        print(
            f"{len(copied)} lease(s) {'would be ' if args.dry_run else ''}copied from {args.source}, "
            f"{len(skipped)} skipped"
        )
    if copied and not args.dry_run:
        warning = _audit_admin(settings, copied, "migrated", "mapping leases migrate")
        if warning:
            print(f"slurmproxy: warning: {warning}", file=sys.stderr)
    return EXIT_OK


async def _end_leases(settings: Settings, store: Any, args: argparse.Namespace, action: str) -> int:
    if action == "release":
        if (args.issuer is None) != (args.subject is None):
            print("slurmproxy: --issuer and --subject go together", file=sys.stderr)
            return EXIT_CONFIG
        if not (args.account or args.issuer or (args.pool and args.all)):
            print(
                "slurmproxy: say which leases: --account, --issuer with --subject, or --pool with --all",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        ended = await store.release(pool=args.pool, account=args.account, issuer=args.issuer, subject=args.subject)
        reason = "released"
    else:
        ended = await store.release(pool=args.pool, unused_for=args.unused_for, dry_run=args.dry_run)
        reason = "expired"
    verb = "would end " if getattr(args, "dry_run", False) else f"{reason} "
    _print_leases(ended, args.json, verb)
    if not args.json:
        print(f"{len(ended)} lease(s) {'would be ' if getattr(args, 'dry_run', False) else ''}{reason}")
    if ended and not getattr(args, "dry_run", False):
        warning = _audit_admin(settings, ended, reason, f"mapping leases {action}")
        if warning:
            print(f"slurmproxy: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mapping = sub.add_parser("mapping", help="inspect identity mappings and manage pool leases")
    actions = mapping.add_subparsers(dest="mapping_command", required=True)

    show_parser = actions.add_parser("show", help="which backend maps an identity, and to what")
    add_config_argument(show_parser)
    show_parser.add_argument("--issuer", required=True, help="the token issuer, exactly as in `iss`")
    show_parser.add_argument("--subject", required=True, help="the subject (`sub`)")
    show_parser.add_argument("--rule", help="only this rule")
    show_parser.add_argument("--json", action="store_true", help="JSON output")
    show_parser.set_defaults(run=show)

    lease_parser = actions.add_parser("leases", help="list, release or expire pool account leases")
    add_config_argument(lease_parser)
    lease_parser.add_argument("--json", action="store_true", help="JSON output")
    lease_parser.add_argument("--pool", help="only this pool")
    lease_parser.set_defaults(run=leases, action="list")
    lease_actions = lease_parser.add_subparsers(dest="action")
    listing = lease_actions.add_parser("list", help="list leases (the default)")
    release = lease_actions.add_parser("release", help="end leases now")
    release.add_argument("--account", help="the leased account")
    release.add_argument("--issuer", help="the identity's issuer (with --subject)")
    release.add_argument("--subject", help="the identity's subject (with --issuer)")
    release.add_argument("--all", action="store_true", help="every lease of --pool")
    release.set_defaults(dry_run=False)
    expire = lease_actions.add_parser("expire", help="end leases unused for a while")
    expire.add_argument("--unused-for", type=duration, required=True, help="e.g. 30d, 12h, 3600")
    expire.add_argument("--dry-run", action="store_true", help="only show what would end")
    migrate = lease_actions.add_parser("migrate", help="copy the leases of a SQLite lease file into PostgreSQL")
    migrate.add_argument("--from", dest="source", type=Path, required=True, help="the SQLite lease file")
    migrate.add_argument("--dry-run", action="store_true", help="only show what would be copied")
    for parser in (listing, release, expire, migrate):
        # SUPPRESS: an option given before the action (`leases --pool p release`) is not reset by the action's default.
        parser.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS, help="YAML configuration file")
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON output")
        parser.add_argument("--pool", default=argparse.SUPPRESS, help="only this pool")
