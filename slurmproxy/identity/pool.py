"""Pool accounts: an identity with no other mapping leases a free account from a pool and keeps it.

Leases live in one SQLite database shared by every worker process and kept across restarts (WAL
journal, a busy timeout). A new lease is taken inside ``BEGIN IMMEDIATE``, which holds SQLite's
write lock from the first read, so two processes can never choose the same free account; the
primary key on ``account`` and the unique (pool, issuer, subject) make a double lease impossible
even then. Accounts go out in the pool's configured order, the lowest free one first. Leases end
only by an administrator (``slurmproxy mapping leases release|expire``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from slurmproxy.errors import PoolExhausted, PoolUnavailable

logger = logging.getLogger("slurmproxy.identity.pool")
SCHEMA_VERSION = 1
TOUCH_INTERVAL_SECONDS = 60.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    account TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    leased_at REAL NOT NULL,
    last_used REAL NOT NULL,
    UNIQUE (pool, issuer, subject)
)
"""
_COLUMNS = "account, pool, issuer, subject, leased_at, last_used"


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
    new: bool = False

    def audit(self) -> dict[str, Any]:
        """What the audit record says about the lease (field ``mapping_detail``)."""
        return {
            "lease": "new" if self.new else "existing",
            "pool": self.pool,
            "account": self.account,
            "leased_at": _iso(self.leased_at),
        }

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("new")
        data["leased_at"], data["last_used"] = _iso(self.leased_at), _iso(self.last_used)
        return data


class LeaseStore:
    """Synchronous store (the CLI uses it directly; the proxy through :class:`Pools`, off the event loop)."""

    def __init__(
        self,
        path: Path,
        pools: Mapping[str, tuple[str, ...]],
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_seconds: float = 10.0,
    ) -> None:
        self.path = path
        self.pools = dict(pools)
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
                f"SELECT {_COLUMNS} FROM leases WHERE pool = ? AND issuer = ? AND subject = ?",  # noqa: S608
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

    def lease(self, pool: str, issuer: str, subject: str) -> Lease:
        """The identity's lease in ``pool``, taking the first free account if it has none."""
        accounts = self.pools[pool]
        with self._db() as conn, _transaction(conn):
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM leases WHERE pool = ? AND issuer = ? AND subject = ?",  # noqa: S608
                (pool, issuer, subject),
            ).fetchone()
            if row is not None and row[0] in accounts:
                return Lease(*row)
            if row is not None:
                logger.warning("pool %s: dropping the lease of %s, no longer in the pool", pool, row[0])
                conn.execute("DELETE FROM leases WHERE account = ?", (row[0],))
            taken = {r[0] for r in conn.execute("SELECT account FROM leases")}
            free = next((a for a in accounts if a not in taken), None)
            if free is None:
                raise PoolExhausted(
                    f"pool {pool} has no free account: all {len(accounts)} are leased; "
                    "an administrator can release or expire leases (slurmproxy mapping leases)"
                )
            now = self._clock()
            conn.execute(
                f"INSERT INTO leases ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608
                (free, pool, issuer, subject, now, now),
            )
        logger.info("pool %s: leased %s to %s from %s", pool, free, subject, issuer)
        return Lease(free, pool, issuer, subject, now, now, new=True)

    def leases(self, pool: str | None = None) -> list[Lease]:
        query = f"SELECT {_COLUMNS} FROM leases"  # noqa: S608
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
                for row in conn.execute(f"SELECT {_COLUMNS} FROM leases WHERE {condition}", args)  # noqa: S608
            ]
            if not dry_run:
                conn.execute(f"DELETE FROM leases WHERE {condition}", args)  # noqa: S608
        return found


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
    """The proxy's view of the store: every call runs in a worker thread, never on the event loop."""

    def __init__(self, store: LeaseStore) -> None:
        self.store = store

    async def lease(self, pool: str, issuer: str, subject: str) -> Lease:
        existing = await asyncio.to_thread(self.store.find, pool, issuer, subject)
        if existing is not None:
            return existing
        return await asyncio.to_thread(self.store.lease, pool, issuer, subject)

    async def find(self, pool: str, issuer: str, subject: str) -> Lease | None:
        return await asyncio.to_thread(self.store.find, pool, issuer, subject)

    async def free(self, pool: str) -> list[str]:
        return await asyncio.to_thread(self.store.free, pool)
