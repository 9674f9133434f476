"""Pool leases in SQLite: distinct accounts, stable across reopen and across processes, exhaustion, release."""

from __future__ import annotations

import multiprocessing
import sqlite3
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from slurmproxy.config.settings import expand_accounts
from slurmproxy.errors import PoolExhausted, PoolUnavailable
from slurmproxy.identity.pool import LeaseStore, Pools

ISS = "https://idp.example.org"
ACCOUNTS = expand_accounts(("pool001..pool005",))


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def store(tmp_path: Path, accounts: tuple[str, ...] = ACCOUNTS, clock: Clock | None = None) -> LeaseStore:
    return LeaseStore(tmp_path / "leases.sqlite", {"vo": accounts}, clock=clock or Clock()).open()


def test_new_identities_get_the_lowest_free_accounts_and_keep_them(tmp_path: Path) -> None:
    s = store(tmp_path)
    first = s.lease("vo", ISS, "a")
    assert (first.account, first.new) == ("pool001", True)
    assert s.lease("vo", ISS, "b").account == "pool002"
    again = s.lease("vo", ISS, "a")
    assert (again.account, again.new) == ("pool001", False)
    assert s.find("vo", ISS, "a") == again
    assert s.find("vo", ISS, "nobody") is None


def test_same_subject_from_another_issuer_is_another_identity(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert s.lease("vo", ISS, "a").account != s.lease("vo", "https://other.example.org", "a").account


def test_leases_survive_reopening(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.lease("vo", ISS, "a")
    s.lease("vo", ISS, "b")
    s.close()
    reopened = store(tmp_path)
    assert reopened.lease("vo", ISS, "b").account == "pool002"
    assert [lease.account for lease in reopened.leases()] == ["pool001", "pool002"]


def test_database_is_wal_and_private(tmp_path: Path) -> None:
    store(tmp_path).close()
    path = tmp_path / "leases.sqlite"
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert path.stat().st_mode & 0o777 == 0o600


def test_exhaustion_is_503_with_a_clear_error(tmp_path: Path) -> None:
    s = store(tmp_path, expand_accounts(("p1..p2",)))
    s.lease("vo", ISS, "a")
    s.lease("vo", ISS, "b")
    with pytest.raises(PoolExhausted) as err:
        s.lease("vo", ISS, "c")
    assert err.value.status_code == 503 and err.value.reason == "pool_exhausted"
    assert "all 2 are leased" in err.value.detail
    assert s.lease("vo", ISS, "a").account == "p1"  # existing leases still work when the pool is full


def test_release_frees_the_account_for_someone_else(tmp_path: Path) -> None:
    s = store(tmp_path, expand_accounts(("p1..p2",)))
    s.lease("vo", ISS, "a")
    s.lease("vo", ISS, "b")
    (ended,) = s.release(issuer=ISS, subject="a")
    assert ended.account == "p1"
    assert s.lease("vo", ISS, "c").account == "p1"
    assert [lease.account for lease in s.release(account="p2")] == ["p2"]
    with pytest.raises(ValueError, match="condition"):
        s.release()


def test_expire_ends_only_leases_unused_for_long_enough(tmp_path: Path) -> None:
    clock = Clock()
    s = store(tmp_path, clock=clock)
    s.lease("vo", ISS, "old")
    clock.now += 10 * 86400
    s.lease("vo", ISS, "recent")
    assert [lease.subject for lease in s.release(unused_for=5 * 86400, dry_run=True)] == ["old"]
    assert len(s.leases()) == 2
    assert [lease.subject for lease in s.release(unused_for=5 * 86400)] == ["old"]
    assert [lease.subject for lease in s.leases()] == ["recent"]


def test_use_refreshes_last_used_so_active_leases_do_not_expire(tmp_path: Path) -> None:
    clock = Clock()
    s = store(tmp_path, clock=clock)
    s.lease("vo", ISS, "a")
    clock.now += 10 * 86400
    assert s.find("vo", ISS, "a") is not None
    assert s.release(unused_for=86400) == []


def test_account_removed_from_the_pool_is_not_handed_out(tmp_path: Path) -> None:
    s = store(tmp_path, expand_accounts(("p1..p3",)))
    s.lease("vo", ISS, "a")
    s.close()
    shrunk = store(tmp_path, ("p2", "p3"))
    assert shrunk.find("vo", ISS, "a") is None
    assert shrunk.lease("vo", ISS, "a").account == "p2"
    assert [lease.account for lease in shrunk.leases()] == ["p2"]


def test_closed_or_broken_database_is_503(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.close()
    with pytest.raises(PoolUnavailable):
        s.lease("vo", ISS, "a")
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        LeaseStore(tmp_path / "junk.sqlite", {"vo": ACCOUNTS}).open()


def _lease_many(path: str, subjects: list[str], barrier: Any) -> list[str]:
    s = LeaseStore(Path(path), {"vo": expand_accounts(("pool001..pool400",))}).open()
    barrier.wait(60)  # both processes start leasing at the same moment
    try:
        return [s.lease("vo", ISS, subject).account for subject in subjects]
    finally:
        s.close()


def test_two_processes_never_hand_out_the_same_account(tmp_path: Path) -> None:
    path = str(tmp_path / "leases.sqlite")
    LeaseStore(Path(path), {"vo": ()}).open().close()
    batches = [[f"p{p}-{n}" for n in range(200)] for p in range(2)]
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(2, mp_context=context) as pool:
        barrier = manager.Barrier(2)
        results = list(pool.map(_lease_many, [path, path], batches, [barrier, barrier]))
    leased = results[0] + results[1]
    assert len(set(leased)) == 400
    assert sorted(leased) == list(expand_accounts(("pool001..pool400",)))


@pytest.mark.anyio
async def test_async_wrapper_leases_off_the_event_loop(tmp_path: Path) -> None:
    pools = Pools(store(tmp_path))
    first = await pools.lease("vo", ISS, "a")
    again = await pools.lease("vo", ISS, "a")
    assert first.new and not again.new and first.account == again.account
    assert await pools.free("vo") == list(ACCOUNTS[1:])


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        pytest.param(("pool001..pool003",), ("pool001", "pool002", "pool003"), id="range"),
        pytest.param(("vo8..vo10",), ("vo8", "vo9", "vo10"), id="width-grows"),
        pytest.param(("a", "b1..b2"), ("a", "b1", "b2"), id="mixed"),
    ],
)
def test_expand_accounts(items: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert expand_accounts(items) == expected


@pytest.mark.parametrize(
    "items",
    [
        pytest.param(("pool003..pool001",), id="backwards"),
        pytest.param(("pool001..vo005",), id="prefix-differs"),
        pytest.param(("pool1..pool005",), id="width-differs"),
        pytest.param(("Root",), id="uppercase"),
        pytest.param(("p1..p3", "p2"), id="duplicate"),
        pytest.param(("p0..p200000",), id="too-many"),
    ],
)
def test_expand_accounts_refuses(items: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        expand_accounts(items)
