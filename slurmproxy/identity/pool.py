"""Pool accounts: an identity with no other mapping leases a free account from a pool and keeps it.

Two stores implement :class:`LeaseBackend`, with the same rules: the embedded one here (one SQLite
file shared by the workers of one machine) and the shared one in PostgreSQL
(``slurmproxy.state.leases``, for several replicas). In both, a new lease is taken in one
transaction that holds the pool's write lock from its first read (SQLite's ``BEGIN IMMEDIATE``,
PostgreSQL's advisory lock), so two processes can never choose the same free account; the primary
key on ``account`` and the unique (pool, issuer, subject) make a double lease impossible even then.

What a new lease may take (:class:`PoolLimits`, per pool, and a rule's ``max_leases``), checked in
that transaction, in this order:

* **per-rule cap**: a rule's ``pool`` step may say ``max_leases: N``: the identities it admitted
  hold at most N live leases of that pool; the next newcomer gets 503 ``pool_rule_cap``;
* **admission rate**: ``max_new_leases`` per ``new_lease_period_seconds`` (sliding, counted from
  the leases' own ``leased_at``, so every worker and replica counts the same); beyond it 429
  ``pool_admission_limited`` with ``Retry-After``;
* **the account**: the first free one in the pool's configured order; when none is free and the
  pool has ``idle_expiry_seconds``, the lease unused the longest (past that idle time) is ended and
  its account given to the newcomer (``reclaimed`` in the audit record); else 503 ``pool_exhausted``.

A lease past its idle time is still its holder's until someone needs the account: the holder who
comes back first keeps it. Leases also end by an administrator (``slurmproxy mapping leases``).
``last_used`` is refreshed at most every ``TOUCH_INTERVAL_SECONDS``, which is why the idle time is
at least ten times that.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from slurmproxy.errors import PoolCapReached, PoolExhausted, PoolUnavailable, RateLimitedError

logger = logging.getLogger("slurmproxy.identity.pool")
SCHEMA_VERSION = 2
TOUCH_INTERVAL_SECONDS = 60.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    account TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    leased_at REAL NOT NULL,
    last_used REAL NOT NULL,
    rule TEXT,
    UNIQUE (pool, issuer, subject)
)
"""
COLUMNS = "account, pool, issuer, subject, leased_at, last_used, rule"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class Lease:
    account: str
    pool: str
    issuer: str
    subject: str
    leased_at: float
    last_used: float
    rule: str | None = None
    new: bool = False
    reclaimed: bool = False

    def audit(self) -> dict[str, Any]:
        """What the audit record says about the lease (field ``mapping_detail``)."""
        detail: dict[str, Any] = {
            "lease": "new" if self.new else "existing",
            "pool": self.pool,
            "account": self.account,
            "leased_at": _iso(self.leased_at),
        }
        if self.reclaimed:
            detail["reclaimed"] = True  # the account was another identity's idle lease until now
        return detail

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("new")
        data.pop("reclaimed")
        data["leased_at"], data["last_used"] = _iso(self.leased_at), _iso(self.last_used)
        return data


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """A pool's limits on new leases (``identity.pools.NAME``): idle expiry and the admission rate."""

    idle_expiry_seconds: float | None = None
    max_new_leases: int | None = None
    new_lease_period_seconds: float = 3600.0


NO_LIMITS = PoolLimits()


def check_cap(pool: str, rule: str | None, cap: int | None, held: int) -> None:
    """503 ``pool_rule_cap`` when the rule's identities already hold ``cap`` live leases of the pool."""
    if rule is not None and cap is not None and held >= cap:
        raise PoolCapReached(
            f"rule {rule} may hold at most {cap} leases of pool {pool} and holds {held}: no new identity is "
            "admitted to the pool through it until leases end (slurmproxy mapping leases)"
        )


def check_admission(pool: str, limits: PoolLimits, recent: Sequence[float], now: float) -> None:
    """429 ``pool_admission_limited`` when ``recent`` (the ``leased_at`` of the window, oldest first) is full."""
    most = limits.max_new_leases
    if most is None or len(recent) < most:
        return
    period = limits.new_lease_period_seconds
    wait = recent[len(recent) - most] + period - now  # when enough of them have left the window
    retry = max(1, math.ceil(wait))
    raise RateLimitedError(
        f"pool {pool} admits at most {most} new leases per {period:g} s; retry in {retry} s",
        reason="pool_admission_limited",
        headers={"Retry-After": str(retry)},
    )


def first_free(accounts: Iterable[str], taken: set[str]) -> str | None:
    return next((a for a in accounts if a not in taken), None)


def exhausted(pool: str, accounts: Sequence[str], limits: PoolLimits) -> PoolExhausted:
    idle = (
        f" and none unused for {limits.idle_expiry_seconds:g} s (idle_expiry_seconds)"
        if limits.idle_expiry_seconds is not None
        else ""
    )
    return PoolExhausted(
        f"pool {pool} has no free account: all {len(accounts)} are leased{idle}; "
        "an administrator can release or expire leases (slurmproxy mapping leases)"
    )


class LeaseBackend(Protocol):
    """What the identity stage needs of a lease store (embedded: :class:`Pools`; shared: PostgreSQL)."""

    @property
    def pools(self) -> Mapping[str, tuple[str, ...]]: ...

    async def lease(
        self, pool: str, issuer: str, subject: str, *, rule: str | None = None, cap: int | None = None
    ) -> Lease: ...

    async def find(self, pool: str, issuer: str, subject: str) -> Lease | None: ...

    async def free(self, pool: str) -> list[str]: ...


class LeaseStore:
    """Synchronous store (the CLI uses it directly; the proxy through :class:`Pools`, off the event loop)."""

    def __init__(
        self,
        path: Path,
        pools: Mapping[str, tuple[str, ...]],
        *,
        limits: Mapping[str, PoolLimits] | None = None,
        clock: Callable[[], float] = time.time,
        busy_timeout_seconds: float = 10.0,
    ) -> None:
        self.path = path
        self.pools = dict(pools)
        self.limits = dict(limits or {})
        self._clock = clock
        self._busy = busy_timeout_seconds
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def open(self) -> LeaseStore:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self._busy, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL (journal_mode is {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            with _transaction(conn):
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(
                        f"{self.path} has schema {version}; this version knows {SCHEMA_VERSION}"
                    )
                conn.execute(_SCHEMA)
                if version == 1:  # version 1 had no rule column: its leases were taken under no cap
                    conn.execute("ALTER TABLE leases ADD COLUMN rule TEXT")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error:
            conn.close()
            raise
        self.path.chmod(0o600)
        self._conn = conn
        return self

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        if self._conn is None:
            raise PoolUnavailable("the pool lease database is not open")
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                logger.error("pool lease database %s: %s", self.path, exc)
                raise PoolUnavailable(f"the pool lease database failed ({type(exc).__name__})") from exc

    def find(self, pool: str, issuer: str, subject: str) -> Lease | None:
        """The identity's lease in ``pool``, if it has a valid one; refreshes ``last_used`` now and then."""
        with self._db() as conn:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM leases WHERE pool = ? AND issuer = ? AND subject = ?",  # noqa: S608
                (pool, issuer, subject),
            ).fetchone()
            if row is None or row[0] not in self.pools.get(pool, ()):
                return None
            lease = Lease(*row)
            now = self._clock()
            if now - lease.last_used >= TOUCH_INTERVAL_SECONDS:
                try:
                    conn.execute("UPDATE leases SET last_used = ? WHERE account = ?", (now, lease.account))
                except sqlite3.OperationalError as exc:  # only bookkeeping: the lease itself is fine
                    logger.warning("pool %s: could not record the use of %s: %s", pool, lease.account, exc)
        return lease

    def lease(self, pool: str, issuer: str, subject: str, *, rule: str | None = None, cap: int | None = None) -> Lease:
        """The identity's lease in ``pool``, taking an account (under the pool's limits) if it has none."""
        accounts = self.pools[pool]
        limits = self.limits.get(pool, NO_LIMITS)
        with self._db() as conn, _transaction(conn):
            row = conn.execute(
                f"SELECT {COLUMNS} FROM leases WHERE pool = ? AND issuer = ? AND subject = ?",  # noqa: S608
                (pool, issuer, subject),
            ).fetchone()
            if row is not None and row[0] in accounts:
                return Lease(*row)
            if row is not None:
                logger.warning("pool %s: dropping the lease of %s, no longer in the pool", pool, row[0])
                conn.execute("DELETE FROM leases WHERE account = ?", (row[0],))
            now = self._clock()
            idle_since = now - limits.idle_expiry_seconds if limits.idle_expiry_seconds is not None else -math.inf
            if rule is not None and cap is not None:
                (held,) = conn.execute(
                    "SELECT COUNT(*) FROM leases WHERE pool = ? AND rule = ? AND last_used > ?",
                    (pool, rule, idle_since),
                ).fetchone()
                check_cap(pool, rule, cap, held)
            if limits.max_new_leases is not None:
                recent = conn.execute(
                    "SELECT leased_at FROM leases WHERE pool = ? AND leased_at > ? ORDER BY leased_at",
                    (pool, now - limits.new_lease_period_seconds),
                ).fetchall()
                check_admission(pool, limits, [r[0] for r in recent], now)
            taken = {r[0] for r in conn.execute("SELECT account FROM leases")}
            account, reclaimed = first_free(accounts, taken), False
            if account is None and limits.idle_expiry_seconds is not None:
                account = self._reclaim(conn, pool, accounts, idle_since)
                reclaimed = account is not None
            if account is None:
                raise exhausted(pool, accounts, limits)
            conn.execute(
                f"INSERT INTO leases ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (account, pool, issuer, subject, now, now, rule),
            )
        logger.info("pool %s: leased %s to %s from %s", pool, account, subject, issuer)
        return Lease(account, pool, issuer, subject, now, now, rule, new=True, reclaimed=reclaimed)

    @staticmethod
    def _reclaim(conn: sqlite3.Connection, pool: str, accounts: tuple[str, ...], idle_since: float) -> str | None:
        members = set(accounts)
        for account, issuer, subject, last_used in conn.execute(
            "SELECT account, issuer, subject, last_used FROM leases WHERE pool = ? AND last_used <= ? "
            "ORDER BY last_used, account",
            (pool, idle_since),
        ).fetchall():
            if account in members:
                conn.execute("DELETE FROM leases WHERE account = ?", (account,))
                logger.info(
                    "pool %s: reclaimed %s from %s (%s), unused since %s",
                    pool,
                    account,
                    subject,
                    issuer,
                    _iso(last_used),
                )
                return str(account)
        return None

    def leases(self, pool: str | None = None) -> list[Lease]:
        query = f"SELECT {COLUMNS} FROM leases"  # noqa: S608
        with self._db() as conn:
            rows = (
                conn.execute(query + " WHERE pool = ? ORDER BY account", (pool,))
                if pool
                else conn.execute(query + " ORDER BY pool, account")
            )
            return [Lease(*row) for row in rows]

    def free(self, pool: str) -> list[str]:
        with self._db() as conn:
            taken = {r[0] for r in conn.execute("SELECT account FROM leases")}
        return [a for a in self.pools.get(pool, ()) if a not in taken]

    def release(
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
                where.append(f"{column} = ?")
                args.append(value)
        if unused_for is not None:
            where.append("last_used <= ?")
            args.append(self._clock() - unused_for)
        if not where:
            raise ValueError("release needs at least one condition")
        condition = " AND ".join(where)
        with self._db() as conn, _transaction(conn):
            found = [
                Lease(*row)
                for row in conn.execute(f"SELECT {COLUMNS} FROM leases WHERE {condition}", args)  # noqa: S608
            ]
            if not dry_run:
                conn.execute(f"DELETE FROM leases WHERE {condition}", args)  # noqa: S608
        return found


def read_leases(path: Path) -> list[Lease]:
    """Every lease in a SQLite lease file, opened read-only (schema 1 or 2), for copying elsewhere."""
    if not path.is_file():
        raise PoolUnavailable(f"no lease database at {path}")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise PoolUnavailable(f"{path} has schema {version}; this version knows {SCHEMA_VERSION}")
        columns = COLUMNS if version >= 2 else COLUMNS.replace(", rule", ", NULL")
        rows = conn.execute(f"SELECT {columns} FROM leases ORDER BY pool, account").fetchall()  # noqa: S608
    except sqlite3.Error as exc:
        raise PoolUnavailable(f"cannot read the lease database {path} ({type(exc).__name__}: {exc})") from exc
    finally:
        conn.close()
    return [Lease(*row) for row in rows]


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Pools:
    """The embedded :class:`LeaseBackend`: every call runs in a worker thread, never on the event loop."""

    def __init__(self, store: LeaseStore) -> None:
        self.store = store

    @property
    def pools(self) -> Mapping[str, tuple[str, ...]]:
        return self.store.pools

    async def lease(
        self, pool: str, issuer: str, subject: str, *, rule: str | None = None, cap: int | None = None
    ) -> Lease:
        existing = await asyncio.to_thread(self.store.find, pool, issuer, subject)
        if existing is not None:
            return existing
        return await asyncio.to_thread(lambda: self.store.lease(pool, issuer, subject, rule=rule, cap=cap))

    async def find(self, pool: str, issuer: str, subject: str) -> Lease | None:
        return await asyncio.to_thread(self.store.find, pool, issuer, subject)

    async def free(self, pool: str) -> list[str]:
        return await asyncio.to_thread(self.store.free, pool)
