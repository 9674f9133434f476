"""The devstack's PostgreSQL 15, driven with psycopg 3 and psycopg-pool as the proxy will drive it."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devstack.postgres import PostgresServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path_factory.mktemp("pg")) as srv:
        yield srv


def test_role_database_and_scram_password(server: PostgresServer) -> None:
    assert server.startup_seconds < 5
    assert server.password_file.read_text().strip() == server.password
    with psycopg.connect(server.dsn, connect_timeout=5) as conn:
        row = conn.execute("SELECT current_user, current_database(), inet_server_addr()::text").fetchone()
        assert row == (server.user, server.database, "127.0.0.1/32")
        conn.execute("CREATE TABLE IF NOT EXISTS kv (k text PRIMARY KEY, v text)")
        conn.execute("INSERT INTO kv VALUES ('a', '1') ON CONFLICT (k) DO UPDATE SET v = excluded.v")
    with psycopg.connect(server.superuser_dsn, connect_timeout=5) as admin:
        row = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (server.user,)).fetchone()
    assert row is not None
    verifier = row[0]
    assert verifier.startswith("SCRAM-SHA-256$")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(server.dsn.replace(server.password, "wrong"), connect_timeout=5)
    with pytest.raises(psycopg.OperationalError):  # no trust anywhere: no password, no connection
        psycopg.connect(server.dsn_without_password, connect_timeout=5)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.2", server.port), timeout=2):
        pass  # TCP on 127.0.0.1 only
    assert server.psql("SELECT v FROM kv WHERE k = 'a'") == "1"


def test_server_runs_as_postgres_in_its_own_tree(server: PostgresServer) -> None:
    assert server.pid is not None
    uid_line = next(
        line for line in Path(f"/proc/{server.pid}/status").read_text().splitlines() if line.startswith("Uid:")
    )
    assert int(uid_line.split()[1]) != 0
    assert (server.data_dir / "PG_VERSION").read_text().strip() == "15"
    assert any(p.name.startswith(".s.PGSQL.") for p in server.socket_dir.iterdir())
    assert len(server.pids()) >= 4  # postmaster, checkpointer, walwriter, ... (their titles hide the marker)


def test_restart_kill_and_pause(server: PostgresServer) -> None:
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS events (id int)")
        conn.execute("INSERT INTO events VALUES (1)")
    port = server.port
    server.restart()
    assert server.port == port
    assert server.psql("SELECT count(*) FROM events") == "1"
    server.psql("INSERT INTO events VALUES (2)")
    server.kill()  # postmaster and backends at once, like a crash
    assert server.pids() == []
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.dsn, connect_timeout=2)
    server.start()  # crash recovery
    assert server.psql("SELECT count(*) FROM events") == "2"
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        server.pause()
        answers: list[tuple[int, ...] | None] = []
        query = threading.Thread(target=lambda: answers.append(conn.execute("SELECT 42").fetchone()))
        try:
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(server.dsn, connect_timeout=1)  # accepted by the kernel, never answered
            query.start()
            query.join(0.5)
            assert query.is_alive() and answers == []  # the open connection hangs as well
        finally:
            server.resume()
        query.join(10)
        assert answers == [(42,)]  # ... and is answered once the server runs again


def test_pool_survives_a_restart(server: PostgresServer) -> None:
    with ConnectionPool(server.dsn, min_size=1, max_size=2, timeout=10, open=True) as pool:
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        server.restart()
        pool.check()  # drops the connections the restart closed, opens new ones
        with pool.connection() as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)
