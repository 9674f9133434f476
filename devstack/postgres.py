"""A real PostgreSQL 15 (Debian 12's ``postgresql-15``) in its own data directory, on loopback.

Never the system cluster: ``initdb`` makes a fresh cluster in the instance's directory and
``postgres -D <data>`` runs it in the foreground, as the Unix user ``postgres`` (PostgreSQL refuses
to run as root). Its Unix socket lives in the instance's directory, TCP listens on 127.0.0.1 only,
and every connection, local or TCP, authenticates with scram-sha-256: there is no ``trust`` line.
The application role and database (both ``slurmproxy`` by default) have a random password, also
written alone to ``password_file`` (0600) as the proxy's settings will read it.

Durability is traded for speed with ``fsync=off`` (and ``full_page_writes=off``) only: a commit
still writes its WAL to the kernel before it returns, so committed data survives ``stop()``,
``restart()`` and ``kill()`` (a crash of the server processes, followed by crash recovery at the
next ``start()``), just not a crash of the machine. ``synchronous_commit`` stays on: with it off,
a SIGKILL loses the last commits.

Stdlib only; tests talk to it with psycopg (``dsn``) or ``psql()``.
"""

from __future__ import annotations

import os
import pwd
import secrets
import signal
from pathlib import Path

from ._proc import DevstackError, free_port, port_open, run
from ._service import Service

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "postgres"


class PostgresServer(Service):
    """``PostgresServer(workdir, user="slurmproxy", database="slurmproxy", port=None, start_timeout=60)``.

    ``dsn`` is a libpq URL with the password (``postgresql://slurmproxy:<pw>@127.0.0.1:<port>/slurmproxy``);
    ``dsn_without_password`` the same without it (pair it with ``password_file``).
    """

    kind = "postgres"
    _user = "postgres"
    _stop_signal = signal.SIGINT  # "fast" shutdown: disconnects clients, checkpoints, exits

    def __init__(
        self,
        workdir: Path,
        *,
        user: str = "slurmproxy",
        database: str = "slurmproxy",
        port: int | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        super().__init__(workdir, start_timeout=start_timeout)
        if not (PG_BIN / "postgres").exists():
            raise DevstackError(f"{PG_BIN}/postgres is missing: run devstack/setup.sh --postgres")
        self.port = port or free_port()
        self.user = user
        self.database = database
        self.password = secrets.token_urlsafe(24)
        self.superuser_password = secrets.token_urlsafe(24)

    # ------------------------------------------------------------------ what tests use
    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    @property
    def dsn_without_password(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    @property
    def superuser_dsn(self) -> str:
        return f"postgresql://{SUPERUSER}:{self.superuser_password}@127.0.0.1:{self.port}/postgres"

    @property
    def password_file(self) -> Path:
        return self.directory / "password"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def socket_dir(self) -> Path:
        return self.directory / "socket"

    def psql(self, sql: str, *, superuser: bool = False, database: str | None = None) -> str:
        """Run ``sql`` with psql over the instance's Unix socket; unaligned tuples-only output."""
        user, password = (SUPERUSER, self.superuser_password) if superuser else (self.user, self.password)
        argv = [
            str(PG_BIN / "psql"),
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-h",
            str(self.socket_dir),
            "-p",
            str(self.port),
            "-U",
            user,
            "-d",
            database or (self.database if not superuser else "postgres"),
            "-c",
            sql,
        ]
        env = {"PATH": "/usr/bin:/bin", "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
        return run(argv, env=env, timeout=60).stdout.rstrip("\n")

    # ------------------------------------------------------------------ Service
    def _prepare(self) -> None:
        for sub in (self.data_dir, self.socket_dir):
            sub.mkdir(mode=0o700)
        pwfile = self.directory / "superuser.pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.superuser_password + "\n")
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.password + "\n")
        owner = pwd.getpwnam(self._user or SUPERUSER)
        for path in (self.data_dir, self.socket_dir, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        self.run_as_user(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
                "--no-instructions",
            ],
            timeout=120,
        )
        pwfile.unlink()
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "password_encryption": "'scram-sha-256'",
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "log_connections": "off",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# slurmproxy devstack\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )

    def start(self) -> PostgresServer:
        first = not self._prepared
        super().start()
        if first:
            quoted = self.password.replace("'", "''")
            self.psql(f"CREATE ROLE \"{self.user}\" LOGIN PASSWORD '{quoted}'", superuser=True)
            self.psql(f'CREATE DATABASE "{self.database}" OWNER "{self.user}"', superuser=True)
        return self

    def _argv(self) -> list[str]:
        return [str(PG_BIN / "postgres"), "-D", str(self.data_dir)]

    def _ready(self) -> bool:
        """postmaster.pid says ``ready`` (line 8: accepting connections) and the TCP port is open."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready" and port_open(self.port)
