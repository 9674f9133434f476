"""A private MariaDB server for one cluster's slurmdbd: its own datadir, socket and port.

The host's Debian 12 ``mariadb-server`` binaries run as the ``mysql`` user, with
``--no-defaults`` so nothing of the system instance's configuration (``/etc/mysql``) applies, a
datadir and a unix socket in the cluster's tree and a TCP port on 127.0.0.1. slurmdbd (on the host
for 22.05, inside a chroot for the newer generations) connects over TCP: Slurm gives the client
library no socket path, and its compiled-in default is the system instance's.

An initialised datadir (``mariadb-install-db``) is built once per MariaDB version into the cache
directory and copied for every server, because initialising takes seconds and copying does not.

The server speaks TLS with a self-signed certificate for ``IP:127.0.0.1`` (:attr:`MariaDB.tls_ca`):
the MariaDB Connector/C 3.4 in Debian testing (Slurm 26.05's chroot) requires TLS by default, and
slurmdbd, whose first connection then fails with "2026 TLS/SSL error: SSL is required, but the
server does not support it", retries only after 5 seconds. slurmdbd is given the certificate as its
CA (``StorageParameters=SSL_CA=...``), so the connection is verified, for every generation.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from ._proc import DevstackError, flocked, free_port, run, spawn, tail, terminate, wait_until

MARIADBD = Path("/usr/sbin/mariadbd")
INSTALL_DB = Path("/usr/bin/mariadb-install-db")
CLIENT = Path("/usr/bin/mariadb")
DB_USER = "mysql"
SLURM_DB = "slurm_acct_db"
SLURM_DB_USER = "slurm"

INNODB_OPTIONS = (
    # slurmdbd logs "Database settings not recommended values" below these.
    "--innodb-buffer-pool-size=128M",
    "--innodb-log-file-size=64M",
    "--innodb-lock-wait-timeout=900",
    # A test database: durability is not wanted, speed is.
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
)
"""Given to ``mariadb-install-db`` too, so the template's redo log already has the server's size."""

SERVER_OPTIONS = (
    "--bind-address=127.0.0.1",
    "--skip-name-resolve",
    "--skip-log-bin",
    "--performance-schema=OFF",
    "--max-connections=64",
    "--sync-binlog=0",
    *INNODB_OPTIONS,
)


def _cache_dir() -> Path:
    return Path(os.environ.get("SLURMPROXY_DEVSTACK_CACHE", "/var/cache/slurmproxy-devstack"))


def server_version() -> str:
    """``mariadbd --version``'s version, e.g. ``10.11.11-MariaDB-0+deb12u1``."""
    if not MARIADBD.exists():
        raise DevstackError(f"{MARIADBD} missing: run devstack/setup.sh (installs mariadb-server)")
    out = run([str(MARIADBD), "--no-defaults", "--version"], timeout=30).stdout.split()
    return out[out.index("Ver") + 1] if "Ver" in out else out[-1]


def _as_mysql(argv: list[str]) -> list[str]:
    entry = pwd.getpwnam(DB_USER)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", *argv]


def tls_files() -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (owner mysql), made once under a flock."""
    directory = _cache_dir() / "mariadb-tls"
    cert, key = directory / "server.pem", directory / "server-key.pem"
    if cert.exists() and key.exists():
        return cert, key
    with flocked(directory.parent / ".mariadb-tls.lock", timeout=120):
        if cert.exists() and key.exists():
            return cert, key
        tmp = directory.parent / f"mariadb-tls.build-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-keyout", str(tmp / key.name), "-out", str(tmp / cert.name),
            ],
            timeout=60,
        )  # fmt: skip
        entry = pwd.getpwnam(DB_USER)
        os.chown(tmp / key.name, entry.pw_uid, entry.pw_gid)
        (tmp / key.name).chmod(0o600)
        (tmp / cert.name).chmod(0o644)
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    return cert, key


def template_datadir() -> Path:
    """An initialised, never-started datadir for this MariaDB version, built once under a flock."""
    version = server_version()
    template = _cache_dir() / f"mariadb-{version}-datadir"
    if (template / ".devstack-complete").exists():
        return template
    with flocked(template.parent / f".{template.name}.lock", timeout=300):
        if (template / ".devstack-complete").exists():
            return template
        tmp = template.parent / f"{template.name}.build-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        entry = pwd.getpwnam(DB_USER)
        os.chown(tmp, entry.pw_uid, entry.pw_gid)
        run(
            _as_mysql(
                [
                    str(INSTALL_DB),
                    "--no-defaults",
                    f"--datadir={tmp}",
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                    "--skip-name-resolve",
                    *INNODB_OPTIONS,
                ]
            ),
            timeout=180,
        )
        (tmp / ".devstack-complete").write_text(version + "\n")
        shutil.rmtree(template, ignore_errors=True)
        tmp.rename(template)
    return template


class MariaDB:
    """One MariaDB server, owned by this object, for one slurmdbd.

    ``directory`` must be traversable by the ``mysql`` user; the server's files go to
    ``<directory>/data`` (owned by mysql, 0700). :attr:`password` is the slurmdbd account's.
    """

    def __init__(self, directory: Path, log: Path, env: Mapping[str, str], start_timeout: float = 60) -> None:
        self.directory = directory
        self.log = log
        self._env = dict(env)
        self._start_timeout = start_timeout
        self.port = 0
        self.password = secrets.token_urlsafe(18)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def datadir(self) -> Path:
        return self.directory / "data"

    @property
    def tls_ca(self) -> Path:
        """The server's certificate, in the cluster's tree (a chroot's slurmdbd sees it at this path)."""
        return self.directory / "ca.pem"

    @property
    def socket(self) -> Path:
        return self.directory / "run" / "mysqld.sock"

    def start(self) -> None:
        """Copy the template datadir, start mariadbd, create slurmdbd's account; return when ready."""
        template = template_datadir()
        cert, key = tls_files()
        self.directory.mkdir(mode=0o755, exist_ok=True)
        shutil.copyfile(cert, self.tls_ca)
        self.tls_ca.chmod(0o644)
        shutil.copytree(template, self.datadir, symlinks=True)
        entry = pwd.getpwnam(DB_USER)
        for path in (self.datadir, *self.datadir.rglob("*")):
            os.lchown(path, entry.pw_uid, entry.pw_gid)
        self.datadir.chmod(0o700)
        (self.directory / "run").mkdir(mode=0o755, exist_ok=True)
        os.chown(self.directory / "run", entry.pw_uid, entry.pw_gid)
        self.log.touch()
        os.chown(self.log, entry.pw_uid, entry.pw_gid)
        self.port = free_port()
        argv = _as_mysql(
            [
                str(MARIADBD),
                "--no-defaults",
                f"--datadir={self.datadir}",
                f"--socket={self.socket}",
                f"--port={self.port}",
                f"--pid-file={self.directory / 'run' / 'mariadbd.pid'}",
                f"--log-error={self.log}",
                f"--ssl-cert={cert}",
                f"--ssl-key={key}",
                *SERVER_OPTIONS,
            ]
        )
        self._proc = spawn(argv, self.log.with_suffix(".stdout.log"), self._env)
        wait_until(
            lambda: self._ping(),
            timeout=self._start_timeout,
            what="mariadbd to answer on its socket",
            logs=[self.log, self.log.with_suffix(".stdout.log")],
            alive=self._dead_message,
        )
        # The database exists before slurmdbd connects: slurmdbd 26.05 creates a missing one and
        # reconnects on the same handle, after which Connector/C 3.4 fails every query with
        # "5027 Number of columns in result (=1) set execeeds maxmimum allowed number of columns (=0)".
        self.sql(
            f"CREATE DATABASE {SLURM_DB};"
            f"CREATE USER '{SLURM_DB_USER}'@'127.0.0.1' IDENTIFIED BY '{self.password}';"
            f"GRANT ALL ON {SLURM_DB}.* TO '{SLURM_DB_USER}'@'127.0.0.1';"
        )

    def sql(self, statements: str, timeout: float = 30) -> str:
        """Run SQL as the server's root (unix-socket authentication as the host's root)."""
        return run(
            [str(CLIENT), "--no-defaults", f"--socket={self.socket}", "-u", "root", "-N", "-B", "-e", statements],
            timeout=timeout,
        ).stdout

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            terminate(proc.pid, grace=15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ping(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            self.sql("SELECT 1", timeout=10)
        except DevstackError:
            return False
        return True

    def _dead_message(self) -> str | None:
        if self._proc is None or self._proc.poll() is None:
            return None
        return f"mariadbd exited with status {self._proc.returncode}\n{tail(self.log, 20)}"
