"""``slurmproxy mapping leases`` (and ``mapping show``) against PostgreSQL, and the migration from SQLite."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devstack.postgres import PostgresServer
from slurmproxy.cli import main
from slurmproxy.identity.pool import LeaseStore
from tests.helpers import ISSUER, basic_policy, make_settings

pytestmark = pytest.mark.integration


def configure(tmp_path: Path, postgres: PostgresServer, **identity: Any) -> str:
    policy = basic_policy(mapping=[{"table": "users"}, {"pool": "vo"}])
    make_settings(
        tmp_path,
        policy,
        identity={"pools": {"vo": {"accounts": ["pool001..pool005"]}}, **identity},
        state={
            "backend": "shared",
            "redis": {"url": "redis://127.0.0.1:1/0"},  # never asked by these commands
            "postgres": {"dsn": postgres.dsn_without_password, "password_file": str(postgres.password_file)},
        },
    )
    return str(tmp_path / "config.yaml")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def sqlite_file(tmp_path: Path, version: int = 2) -> Path:
    path = tmp_path / "old" / "leases.sqlite"
    store = LeaseStore(path, {"vo": ("pool001", "pool002", "pool003", "gone01")}).open()
    for subject in ("bob@example.org", "carol@example.org", "dave@example.org"):
        store.lease("vo", ISSUER, subject)
    store.close()
    with sqlite3.connect(path) as conn:  # one lease of an account the pool no longer has
        conn.execute("UPDATE leases SET account = 'gone01' WHERE subject = 'dave@example.org'")
        if version == 1:  # the file as the previous release wrote it: no rule column
            conn.execute("ALTER TABLE leases DROP COLUMN rule")
            conn.execute("PRAGMA user_version = 1")
    return path


@pytest.mark.parametrize("version", [1, 2])
def test_migrate_copies_leases_and_the_commands_work_on_postgres(
    tmp_path: Path, clean_postgres: PostgresServer, capsys: pytest.CaptureFixture[str], version: int
) -> None:
    config = configure(tmp_path, clean_postgres)
    source = sqlite_file(tmp_path, version)
    status, out, err = run(
        capsys, "mapping", "leases", "--config", config, "migrate", "--from", str(source), "--dry-run"
    )
    assert status == 0, err
    assert "2 lease(s) would be copied" in out and "1 skipped" in out and "gone01" in out
    with psycopg.connect(clean_postgres.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('slurmproxy_leases')").fetchone() == (None,)  # a dry run writes nothing

    status, out, err = run(capsys, "mapping", "leases", "--config", config, "migrate", "--from", str(source))
    assert status == 0, err
    assert "2 lease(s) copied" in out
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert {(r["method"], r["reason"], r["local_user"]) for r in records} == {
        ("ADMIN", "lease_migrated", "pool001"),
        ("ADMIN", "lease_migrated", "pool002"),
    }

    status, out, _ = run(capsys, "mapping", "leases", "--config", config, "--json")
    assert [(d["account"], d["subject"]) for d in json.loads(out)] == [
        ("pool001", "bob@example.org"),
        ("pool002", "carol@example.org"),
    ]
    status, out, _ = run(capsys, "mapping", "leases", "--config", config)
    assert "pool vo: 2 of 5 leased" in out

    status, out, _ = run(capsys, "mapping", "leases", "--config", config, "migrate", "--from", str(source))
    assert "0 lease(s) copied" in out and "already here" in out  # running it twice changes nothing

    status, out, _ = run(
        capsys, "mapping", "show", "--config", config, "--issuer", ISSUER, "--subject", "carol@example.org"
    )
    assert status == 0 and "pool002" in out

    status, out, _ = run(capsys, "mapping", "leases", "--config", config, "release", "--account", "pool001")
    assert status == 0 and "1 lease(s) released" in out
    status, out, _ = run(capsys, "mapping", "leases", "--config", config, "expire", "--unused-for", "0s")
    assert status == 0 and "1 lease(s) expired" in out
    _, out, _ = run(capsys, "mapping", "leases", "--config", config, "--json")
    assert json.loads(out) == []


def test_migrate_never_overwrites_a_lease_the_database_has(
    tmp_path: Path, clean_postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = configure(tmp_path, clean_postgres)
    source = sqlite_file(tmp_path)
    first = tmp_path / "first.sqlite"
    store = LeaseStore(first, {"vo": ("pool001", "pool002")}).open()
    store.lease("vo", ISSUER, "erin@example.org")  # pool001, to someone else than in `source`
    store.close()
    assert run(capsys, "mapping", "leases", "--config", config, "migrate", "--from", str(first))[0] == 0
    status, out, _ = run(capsys, "mapping", "leases", "--config", config, "migrate", "--from", str(source))
    assert status == 0
    assert "account leased here to erin@example.org" in out and "1 lease(s) copied" in out


def test_migrate_needs_the_shared_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_settings(
        tmp_path,
        basic_policy(mapping=[{"pool": "vo"}]),
        identity={"pools": {"vo": {"accounts": ["p1"]}}, "pool_database": str(tmp_path / "l.sqlite")},
    )
    status, _, err = run(
        capsys, "mapping", "leases", "--config", str(tmp_path / "config.yaml"), "migrate", "--from", "x.sqlite"
    )
    assert status == 2 and "set state.backend: shared first" in err
