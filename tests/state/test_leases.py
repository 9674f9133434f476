"""Pool leases with limits (issue 15, item 11) in both stores, and the PostgreSQL store across replicas.

Every limit test runs against the embedded SQLite store and the shared PostgreSQL one with the same
expectations: pools could be used up for good (50 identities held a 50-account pool for ever, with no
cap per rule and no limit on how fast newcomers took accounts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from devstack.postgres import PostgresServer
from slurmproxy.config.settings import PoolSettings, expand_accounts
from slurmproxy.errors import PoolCapReached, PoolExhausted, PoolUnavailable, RateLimitedError
from slurmproxy.identity.pool import Lease, LeaseStore, PoolLimits, Pools
from slurmproxy.state.leases import SharedLeases
from slurmproxy.state.postgres import Postgres
from tests.state.conftest import state_settings

pytestmark = [pytest.mark.integration, pytest.mark.anyio]
ISS = "https://idp.example.org"
HOUR = 3600.0
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Store:
    """One async face for both stores: what the proxy calls, and the admin's listing and release."""

    def __init__(self, backend: Pools | SharedLeases) -> None:
        self.backend = backend

    async def lease(self, subject: str, *, rule: str | None = None, cap: int | None = None) -> Lease:
        return await self.backend.lease("vo", ISS, subject, rule=rule, cap=cap)

    async def find(self, subject: str) -> Lease | None:
        return await self.backend.find("vo", ISS, subject)

    async def holders(self) -> dict[str, str]:
        if isinstance(self.backend, Pools):
            leases = await asyncio.to_thread(self.backend.store.leases)
        else:
            leases = await self.backend.leases()
        return {lease.subject: lease.account for lease in leases}


StoreFactory = Callable[..., Store]


@pytest.fixture(params=["sqlite", "postgres"])
async def make_store(
    request: pytest.FixtureRequest, tmp_path: Path, clean_postgres: PostgresServer
) -> AsyncIterator[StoreFactory]:
    opened: list[Any] = []

    def make(accounts: tuple[str, ...], clock: Clock, **limits: Any) -> Store:
        pool_limits = {"vo": PoolLimits(**limits)}
        if request.param == "sqlite":
            store = LeaseStore(tmp_path / "leases.sqlite", {"vo": accounts}, limits=pool_limits, clock=clock).open()
            opened.append(store)
            return Store(Pools(store))
        db = Postgres(state_settings(postgres=clean_postgres))
        opened.append(db)
        return Store(SharedLeases(db, {"vo": accounts}, limits=pool_limits, clock=clock))

    yield make
    for thing in opened:
        if isinstance(thing, Postgres):
            await thing.close()
        else:
            thing.close()


async def test_50_identities_no_longer_hold_a_50_account_pool_for_ever(make_store: StoreFactory) -> None:
    clock = Clock()
    store = make_store(expand_accounts(("p01..p50",)), clock, idle_expiry_seconds=30 * DAY)
    for n in range(50):
        await store.lease(f"squatter-{n}")
    with pytest.raises(PoolExhausted, match="none unused for 2.592e[+]06 s"):
        await store.lease("newcomer")
    clock.now += 10 * DAY
    await store.find("squatter-7")  # still in use: its lease is refreshed
    clock.now += 21 * DAY  # everyone else has been idle for 31 days
    newcomer = await store.lease("newcomer")
    assert newcomer.new and newcomer.reclaimed and newcomer.account == "p01"  # the one unused the longest
    assert newcomer.audit()["reclaimed"] is True
    holders = await store.holders()
    assert "squatter-0" not in holders and holders["newcomer"] == "p01" and holders["squatter-7"] == "p08"
    again = await store.lease("squatter-0")  # comes back: a new lease of the next idle account
    assert again.new and again.account == "p02"


async def test_the_holder_of_an_idle_lease_keeps_it_until_someone_needs_the_account(make_store: StoreFactory) -> None:
    clock = Clock()
    store = make_store(("p1", "p2"), clock, idle_expiry_seconds=DAY)
    first = await store.lease("alice")
    clock.now += 5 * DAY
    back = await store.lease("alice")
    assert (back.account, back.new) == (first.account, False)
    assert (await store.lease("bob")).account == "p2"  # a free account goes before an idle lease


async def test_without_idle_expiry_a_full_pool_stays_full(make_store: StoreFactory) -> None:
    clock = Clock()
    store = make_store(("p1",), clock)
    await store.lease("alice")
    clock.now += 365 * DAY
    with pytest.raises(PoolExhausted) as refused:
        await store.lease("bob")
    assert refused.value.status_code == 503 and refused.value.reason == "pool_exhausted"


async def test_a_rule_cap_stops_newcomers_of_that_rule_only(make_store: StoreFactory) -> None:
    clock = Clock()
    store = make_store(expand_accounts(("p1..p9",)), clock)
    for n in range(3):
        await store.lease(f"open-{n}", rule="open-vo", cap=3)
    with pytest.raises(PoolCapReached) as refused:
        await store.lease("open-3", rule="open-vo", cap=3)
    error = refused.value
    assert error.status_code == 503 and error.reason == "pool_rule_cap"
    assert "rule open-vo may hold at most 3 leases of pool vo" in error.detail
    assert (await store.lease("open-1", rule="open-vo", cap=3)).account == "p2"  # holders keep theirs
    assert (await store.lease("member", rule="members", cap=3)).account == "p4"  # another rule's share


async def test_idle_leases_do_not_count_against_a_rule_cap(make_store: StoreFactory) -> None:
    clock = Clock()
    store = make_store(expand_accounts(("p1..p9",)), clock, idle_expiry_seconds=DAY)
    await store.lease("a", rule="r", cap=1)
    clock.now += 2 * DAY
    assert (await store.lease("b", rule="r", cap=1)).account == "p2"


async def test_the_admission_rate_limits_how_fast_newcomers_take_accounts(make_store: StoreFactory) -> None:
    clock = Clock()
    store = make_store(expand_accounts(("p01..p50",)), clock, max_new_leases=3, new_lease_period_seconds=HOUR)
    for n in range(3):
        await store.lease(f"n{n}")
        clock.now += 60
    with pytest.raises(RateLimitedError) as refused:
        await store.lease("n3")
    error = refused.value
    assert error.status_code == 429 and error.reason == "pool_admission_limited"
    assert error.headers["Retry-After"] == str(int(HOUR - 180))  # until the first of the three leaves the window
    assert "pool vo admits at most 3 new leases per 3600 s" in error.detail
    assert (await store.lease("n1")).account == "p02"  # holders are not new leases
    clock.now += HOUR - 180
    assert (await store.lease("n3")).account == "p04"
    with pytest.raises(RateLimitedError):
        await store.lease("n4")


def test_idle_expiry_must_be_long_enough_to_see_use() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 600"):
        PoolSettings.model_validate({"accounts": ["p1"], "idle_expiry_seconds": 60})


# -- PostgreSQL across replicas ------------------------------------------------------------------------


async def test_replicas_racing_hand_out_distinct_accounts_and_one_per_identity(clean_postgres: PostgresServer) -> None:
    """Four replicas (four pools of connections) lease for 100 newcomers at once, each newcomer asking
    two replicas at the same moment: 100 distinct accounts, one per identity."""
    accounts = expand_accounts(("pool001..pool100",))
    replicas = [Postgres(state_settings(postgres=clean_postgres, pg={"timeout_seconds": 30})) for _ in range(4)]
    stores = [SharedLeases(db, {"vo": accounts}) for db in replicas]
    try:
        subjects = [f"newcomer-{n:03d}" for n in range(100)]
        calls = [stores[(n + k) % 4].lease("vo", ISS, s) for n, s in enumerate(subjects) for k in (0, 1)]
        leases = await asyncio.gather(*calls)
        by_subject: dict[str, set[str]] = {}
        for lease in leases:
            by_subject.setdefault(lease.subject, set()).add(lease.account)
        assert all(len(found) == 1 for found in by_subject.values()), by_subject
        assert sorted(a for (a,) in by_subject.values()) == list(accounts)
        assert sum(lease.new for lease in leases) == 100
        for store in stores:
            assert {lease.subject: lease.account for lease in await store.leases()} == {
                s: next(iter(a)) for s, a in by_subject.items()
            }
    finally:
        for db in replicas:
            await db.close()


async def test_postgres_down_is_503_pool_unavailable_in_bounded_time_and_recovers(
    clean_postgres: PostgresServer,
) -> None:
    timeout = 1.0
    db = Postgres(state_settings(postgres=clean_postgres, pg={"timeout_seconds": timeout}, retry_seconds=0.2))
    store = SharedLeases(db, {"vo": ("p1", "p2")})
    try:
        alice = await store.lease("vo", ISS, "alice")
        for fault in (clean_postgres.pause, clean_postgres.stop):
            fault()
            try:
                for _ in range(3):  # the first waits at most the timeout; the next fail at once
                    started = time.monotonic()
                    with pytest.raises(PoolUnavailable) as refused:
                        await store.lease("vo", ISS, "alice")
                    assert time.monotonic() - started < timeout + 0.5
                    assert refused.value.status_code == 503 and refused.value.reason == "pool_unavailable"
                    assert "the pool lease database (PostgreSQL" in refused.value.detail
            finally:
                clean_postgres.resume() if fault == clean_postgres.pause else clean_postgres.start()
            deadline = time.monotonic() + 30  # reconnects by itself: no restart of the store
            while True:
                try:
                    found = await store.lease("vo", ISS, "alice")
                    break
                except PoolUnavailable:
                    assert time.monotonic() < deadline, "the lease store did not recover"
                    await asyncio.sleep(0.1)
            assert (found.account, found.new) == (alice.account, False)  # durable: nothing lost
    finally:
        await db.close()


async def test_a_postgres_restart_between_requests_fails_none(clean_postgres: PostgresServer) -> None:
    db = Postgres(state_settings(postgres=clean_postgres, pg={"pool_size": 3}))
    store = SharedLeases(db, {"vo": ("p1", "p2")})
    try:
        holders = await asyncio.gather(*(store.lease("vo", ISS, s) for s in ("alice", "bob")))  # two pooled connections
        clean_postgres.restart()  # every pooled connection is now broken
        again = await asyncio.gather(*(store.lease("vo", ISS, s) for s in ("alice", "bob")))
        assert [lease.account for lease in again] == [lease.account for lease in holders]
    finally:
        await db.close()
