"""ALISE's last-known answers in PostgreSQL, with their age, the same on every replica.

One row per (ALISE service, identity): the local user name ALISE last gave and when (this machine's
wall clock). The identity is stored as an HMAC of issuer and subject (:mod:`slurmproxy.state.keys`),
never in clear: the row is only ever looked up, never listed. Rows older than the service's
``last_known_max_age_seconds`` can never be served and are deleted now and then.

Each worker also keeps its own answers in memory (what the embedded backend does): when PostgreSQL
fails as well as ALISE, ``outage: last_known`` serves from there, so losing the shared store loses
no availability a single replica had. A failed write is logged and counted, never a refusal: ALISE
answered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from slurmproxy.identity.alise import MemoryLastKnown
from slurmproxy.state.guard import BackendDown
from slurmproxy.state.keys import Namer
from slurmproxy.state.postgres import Connection, Postgres

if TYPE_CHECKING:
    from slurmproxy.observability.metrics import Metrics

logger = logging.getLogger("slurmproxy.identity.alise")
TABLE = "slurmproxy_alise_last_known"
PRUNE_INTERVAL_SECONDS = 600.0


class SharedLastKnown:
    """The shared :class:`~slurmproxy.identity.alise.LastKnownStore`."""

    def __init__(
        self,
        db: Postgres,
        namer: Namer,
        max_ages: Mapping[str, float],
        *,
        size: int = 10_000,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._namer = namer
        self._max_ages = dict(max_ages)
        self._metrics = metrics
        self._clock = clock
        self._memory = MemoryLastKnown(size, clock)
        self._pruned = clock()

    def _identity(self, issuer: str, subject: str) -> str:
        return self._namer.digest("alise-identity", issuer, subject)

    async def remember(self, service: str, issuer: str, subject: str, username: str) -> None:
        await self._memory.remember(service, issuer, subject, username)
        identity, now = self._identity(issuer, subject), self._clock()
        prune = now - self._pruned >= PRUNE_INTERVAL_SECONDS
        if prune:
            self._pruned = now

        async def upsert(conn: Connection) -> None:
            await conn.execute(
                f"INSERT INTO {TABLE} (service, identity, username, seen_at) VALUES (%s, %s, %s, %s) "  # noqa: S608
                "ON CONFLICT (service, identity) DO UPDATE "
                "SET username = EXCLUDED.username, seen_at = EXCLUDED.seen_at",
                (service, identity, username, now),
            )
            if prune:
                max_age = self._max_ages.get(service, 86_400.0)
                await conn.execute(
                    f"DELETE FROM {TABLE} WHERE service = %s AND seen_at < %s",  # noqa: S608
                    (service, now - max_age),
                )

        try:
            await self._db.run("alise_last_known", upsert)
        except BackendDown as down:
            logger.warning("ALISE %s: the last-known answer is kept in this worker only: %s", service, down.detail)

    async def recall(self, service: str, issuer: str, subject: str) -> tuple[str, float] | None:
        identity = self._identity(issuer, subject)

        async def select(conn: Connection) -> tuple[str, float] | None:
            cursor = await conn.execute(
                f"SELECT username, seen_at FROM {TABLE} WHERE service = %s AND identity = %s",  # noqa: S608
                (service, identity),
            )
            row = await cursor.fetchone()
            return None if row is None else (str(row[0]), max(0.0, self._clock() - float(row[1])))

        try:
            return await self._db.run("alise_last_known", select)
        except BackendDown as down:
            logger.warning(
                "ALISE %s: the shared last-known answers are unavailable (%s); using this worker's",
                service,
                down.detail,
            )
            if self._metrics is not None:
                self._metrics.state_fallback("alise_last_known")
            return await self._memory.recall(service, issuer, subject)
