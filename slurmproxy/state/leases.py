"""Pool leases in PostgreSQL: the same leases and rules as the embedded SQLite store, for every replica.

A new lease is one transaction that first takes the pool's advisory lock
(``pg_advisory_xact_lock``), so leases of one pool are decided one at a time across every replica
and worker, while the table's primary key (one lease per account) and unique (pool, issuer,
subject) make a double lease impossible whatever happens. Inside it: the identity's existing lease
if it has one, else the per-rule cap, the admission rate and the account, exactly as in
:mod:`slurmproxy.identity.pool` (whose checks this module calls).

Every operation is bounded (``state.postgres.timeout_seconds``) and guarded: when PostgreSQL fails,
a request that needs a lease gets 503 ``pool_unavailable`` (there is no safe alternative: a
per-replica answer could give one identity two accounts). Times are this machine's wall clock, as
in the SQLite store.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from slurmproxy.errors import PoolUnavailable
from slurmproxy.identity.pool import (
    COLUMNS,
    NO_LIMITS,
    TOUCH_INTERVAL_SECONDS,
    Lease,
    PoolLimits,
    check_admission,
    check_cap,
    exhausted,
    first_free,
)
from slurmproxy.state.guard import BackendDown
from slurmproxy.state.postgres import Connection, Postgres

logger = logging.getLogger("slurmproxy.identity.pool")
TABLE = "slurmproxy_leases"
_SELECT = f"SELECT {COLUMNS} FROM {TABLE}"  # noqa: S608


class SharedLeases:
    """The shared :class:`~slurmproxy.identity.pool.LeaseBackend`, and what ``slurmproxy mapping leases`` needs."""

    def __init__(
        self,
        db: Postgres,
        pools: Mapping[str, tuple[str, ...]],
        *,
        limits: Mapping[str, PoolLimits] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._pools = dict(pools)
        self.limits = dict(limits or {})
        self._clock = clock

    @property
    def pools(self) -> Mapping[str, tuple[str, ...]]:
        return self._pools

    async def _run(self, operation: Callable[[Connection], Any]) -> Any:
        try:
            return await self._db.run("leases", operation)
        except BackendDown as down:
            raise PoolUnavailable(f"the pool lease database ({down.detail})") from down

    async def find(self, pool: str, issuer: str, subject: str) -> Lease | None:
        async def find(conn: Connection) -> Lease | None:
            cursor = await conn.execute(
                f"{_SELECT} WHERE pool = %s AND issuer = %s AND subject = %s", (pool, issuer, subject)
            )
            row = await cursor.fetchone()
            if row is None or row[0] not in self._pools.get(pool, ()):
                return None
            lease = Lease(*row)
            now = self._clock()
            if now - lease.last_used >= TOUCH_INTERVAL_SECONDS:
                await conn.execute(f"UPDATE {TABLE} SET last_used = %s WHERE account = %s", (now, lease.account))  # noqa: S608
            return lease

        result: Lease | None = await self._run(find)
        return result

    async def lease(
        self, pool: str, issuer: str, subject: str, *, rule: str | None = None, cap: int | None = None
    ) -> Lease:
        existing = await self.find(pool, issuer, subject)
        if existing is not None:
            return existing
        accounts = self._pools[pool]
        limits = self.limits.get(pool, NO_LIMITS)

        async def lease(conn: Connection) -> Lease:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"slurmproxy-pool:{pool}",)
                )
                return await self._lease_locked(conn, pool, accounts, limits, issuer, subject, rule, cap)

        taken: Lease = await self._run(lease)
        if taken.new:
            logger.info("pool %s: leased %s to %s from %s", pool, taken.account, subject, issuer)
        return taken

    async def _lease_locked(
        self,
        conn: Connection,
        pool: str,
        accounts: tuple[str, ...],
        limits: PoolLimits,
        issuer: str,
        subject: str,
        rule: str | None,
        cap: int | None,
    ) -> Lease:
        cursor = await conn.execute(
            f"{_SELECT} WHERE pool = %s AND issuer = %s AND subject = %s", (pool, issuer, subject)
        )
        row = await cursor.fetchone()
        if row is not None and row[0] in accounts:
            return Lease(*row)
        if row is not None:
            logger.warning("pool %s: dropping the lease of %s, no longer in the pool", pool, row[0])
            await conn.execute(f"DELETE FROM {TABLE} WHERE account = %s", (row[0],))  # noqa: S608
        now = self._clock()
        idle_since = now - limits.idle_expiry_seconds if limits.idle_expiry_seconds is not None else -math.inf
        if rule is not None and cap is not None:
            cursor = await conn.execute(
                f"SELECT COUNT(*) FROM {TABLE} WHERE pool = %s AND rule = %s AND last_used > %s",  # noqa: S608
                (pool, rule, idle_since),
            )
            held = await cursor.fetchone()
            check_cap(pool, rule, cap, int(held[0]) if held else 0)
        if limits.max_new_leases is not None:
            cursor = await conn.execute(
                f"SELECT leased_at FROM {TABLE} WHERE pool = %s AND leased_at > %s ORDER BY leased_at",  # noqa: S608
                (pool, now - limits.new_lease_period_seconds),
            )
            check_admission(pool, limits, [r[0] for r in await cursor.fetchall()], now)
        cursor = await conn.execute(f"SELECT account FROM {TABLE}")  # noqa: S608
        account, reclaimed = first_free(accounts, {r[0] for r in await cursor.fetchall()}), False
        if account is None and limits.idle_expiry_seconds is not None:
            account = await self._reclaim(conn, pool, accounts, idle_since)
            reclaimed = account is not None
        if account is None:
            raise exhausted(pool, accounts, limits)
        await conn.execute(
            f"INSERT INTO {TABLE} ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",  # noqa: S608
            (account, pool, issuer, subject, now, now, rule),
        )
        return Lease(account, pool, issuer, subject, now, now, rule, new=True, reclaimed=reclaimed)

    @staticmethod
    async def _reclaim(conn: Connection, pool: str, accounts: tuple[str, ...], idle_since: float) -> str | None:
        members = set(accounts)
        cursor = await conn.execute(
            f"SELECT account, issuer, subject, last_used FROM {TABLE} WHERE pool = %s AND last_used <= %s "  # noqa: S608
            "ORDER BY last_used, account",
            (pool, idle_since),
        )
        for account, issuer, subject, last_used in await cursor.fetchall():
            if account in members:
                await conn.execute(f"DELETE FROM {TABLE} WHERE account = %s", (account,))  # noqa: S608
                logger.info(
                    "pool %s: reclaimed %s from %s (%s), unused since %.0f", pool, account, subject, issuer, last_used
                )
                return str(account)
        return None

    async def free(self, pool: str) -> list[str]:
        async def taken(conn: Connection) -> set[str]:
            cursor = await conn.execute(f"SELECT account FROM {TABLE}")  # noqa: S608
            return {r[0] for r in await cursor.fetchall()}

        held: set[str] = await self._run(taken)
        return [a for a in self._pools.get(pool, ()) if a not in held]

    # -- for the admin command --------------------------------------------------------------------

    async def leases(self, pool: str | None = None) -> list[Lease]:
        async def listing(conn: Connection) -> list[Lease]:
            if pool:
                cursor = await conn.execute(f"{_SELECT} WHERE pool = %s ORDER BY account", (pool,))
            else:
                cursor = await conn.execute(f"{_SELECT} ORDER BY pool, account")
            return [Lease(*row) for row in await cursor.fetchall()]

        found: list[Lease] = await self._run(listing)
        return found

    async def release(
        self,
        *,
        pool: str | None = None,
        account: str | None = None,
        issuer: str | None = None,
        subject: str | None = None,
        unused_for: float | None = None,
        dry_run: bool = False,
    ) -> list[Lease]:
        """End the leases matching every given condition; return them. At least one condition is required."""
        where: list[str] = []
        args: list[str | float] = []
        for column, value in (("pool", pool), ("account", account), ("issuer", issuer), ("subject", subject)):
            if value is not None:
                where.append(f"{column} = %s")
                args.append(value)
        if unused_for is not None:
            where.append("last_used <= %s")
            args.append(self._clock() - unused_for)
        if not where:
            raise ValueError("release needs at least one condition")
        condition = " AND ".join(where)
        query = (
            f"{_SELECT} WHERE {condition} ORDER BY pool, account"
            if dry_run
            else f"DELETE FROM {TABLE} WHERE {condition} RETURNING {COLUMNS}"  # noqa: S608
        )

        async def end(conn: Connection) -> list[Lease]:
            cursor = await conn.execute(query, args)
            return sorted((Lease(*row) for row in await cursor.fetchall()), key=lambda x: (x.pool, x.account))

        ended: list[Lease] = await self._run(end)
        return ended

    async def copy_in(self, leases: Iterable[Lease]) -> tuple[list[Lease], list[tuple[Lease, str]]]:
        """Copy leases (from the SQLite file) in one transaction: (copied, [(skipped, why)]).

        A lease is skipped when its account is already leased here, or its identity already holds
        another account of its pool here: the database's leases win, nothing is overwritten."""
        wanted = list(leases)

        async def copy(conn: Connection) -> tuple[list[Lease], list[tuple[Lease, str]]]:
            copied: list[Lease] = []
            skipped: list[tuple[Lease, str]] = []
            async with conn.transaction():
                for lease in wanted:
                    cursor = await conn.execute(
                        f"INSERT INTO {TABLE} ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s) "  # noqa: S608
                        "ON CONFLICT DO NOTHING RETURNING account",
                        (
                            lease.account,
                            lease.pool,
                            lease.issuer,
                            lease.subject,
                            lease.leased_at,
                            lease.last_used,
                            lease.rule,
                        ),
                    )
                    if await cursor.fetchone() is not None:
                        copied.append(lease)
                        continue
                    cursor = await conn.execute(f"{_SELECT} WHERE account = %s", (lease.account,))
                    holder = await cursor.fetchone()
                    if holder is not None and (holder[2], holder[3]) == (lease.issuer, lease.subject):
                        skipped.append((lease, "already here"))
                    elif holder is not None:
                        skipped.append((lease, f"account leased here to {holder[3]} ({holder[2]})"))
                    else:
                        skipped.append((lease, "this identity holds another account of the pool here"))
            return copied, skipped

        result: tuple[list[Lease], list[tuple[Lease, str]]] = await self._run(copy)
        return result
