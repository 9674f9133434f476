"""A real Slurm cluster (munge, slurmctld, slurmd, slurmrestd) on loopback, one per scratch directory.

Three generations share one API:

* ``"22.05"``: the host's Debian 12 packages, OpenAPI ``v0.0.38``;
* ``"24.11"``: Debian 13 packages in a debootstrap chroot (see :mod:`devstack.chroot`),
  OpenAPI ``v0.0.40`` to ``v0.0.42``;
* ``"26.05"``: Debian testing (forky) packages in another chroot, OpenAPI ``v0.0.42`` to ``v0.0.45``.

With ``accounting=True`` a cluster also runs slurmdbd (same generation) on its own MariaDB (see
:mod:`devstack.mariadb`), and slurmrestd serves ``/slurmdb/<version>/...`` too.

Every port, pid, spool directory, munge socket and ClusterName is per instance, so several
clusters (of one or both generations, from several test suites) can run on one machine.

Typical use::

    with SlurmCluster(tmp_path) as cluster:
        token = cluster.mint_token("alice", 600)
        httpx.post(cluster.url + "/slurm/v0.0.38/job/submit", ...)
        cluster.wait_job(job_id)
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

from ._proc import (
    DevstackError,
    free_port,
    kill_marked,
    run,
    spawn,
    tail,
    tails,
    terminate,
    wait_until,
)
from .mariadb import MariaDB
from .users import RESTD, SLURM_USER

Generation = Literal["22.05", "24.11", "26.05"]
GENERATIONS: tuple[Generation, ...] = ("22.05", "24.11", "26.05")

FINISHED_STATES: tuple[str, ...] = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
)

HOST_MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
SHARED_TMP_BASE = Path("/var/tmp/slurmproxy-devstack/clusters")
MARKER_ENV = "SLURMPROXY_DEVSTACK_INSTANCE"
_SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Partition:
    """One Slurm partition on node ``localhost``. ``max_time`` uses Slurm's syntax."""

    name: str
    max_time: str = "INFINITE"
    default: bool = False


DEFAULT_PARTITIONS: tuple[Partition, ...] = (
    Partition("debug", "INFINITE", default=True),
    Partition("long", "1-00:00:00"),
)


class Runtime(Protocol):
    """How a generation's binaries are run: on the host (22.05) or inside a chroot (24.11, 26.05)."""

    generation: str

    def restd_plugins(self, accounting: bool) -> tuple[str, ...]:
        """slurmrestd's ``-s``/``-d`` arguments, with the slurmdbd plugin when ``accounting``."""
        ...

    def prepare(self, cluster: SlurmCluster) -> None:
        """Called once per start, after the cluster's tree exists and before any daemon."""

    def command(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` (as root) where the generation's binaries live."""
        ...

    def as_user(self, uid: int, argv: Sequence[str]) -> list[str]:
        """Like :meth:`command`, as ``uid`` (with the group of the same id, no other groups)."""
        ...

    def munge_key(self) -> str:
        """The munge key path, as the munged binary sees it."""
        ...

    def reusable_munge_socket(self) -> Path | None:
        """A running munged this cluster may share, or None to start its own."""
        ...

    def cleanup(self, cluster: SlurmCluster) -> None:
        """Called at stop, after every daemon is gone."""


class _HostRuntime:
    generation = "22.05"

    def restd_plugins(self, accounting: bool) -> tuple[str, ...]:
        return ("-s", "openapi/v0.0.38,openapi/dbv0.0.38" if accounting else "openapi/v0.0.38")

    def prepare(self, cluster: SlurmCluster) -> None:
        pass

    def command(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def as_user(self, uid: int, argv: Sequence[str]) -> list[str]:
        return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]

    def munge_key(self) -> str:
        return "/etc/munge/munge.key"

    def reusable_munge_socket(self) -> Path | None:
        if not HOST_MUNGE_SOCKET.exists():
            return None
        if _munge_roundtrip(self, HOST_MUNGE_SOCKET):
            return HOST_MUNGE_SOCKET
        return None

    def cleanup(self, cluster: SlurmCluster) -> None:
        pass


def _munge_roundtrip(runtime: Runtime, socket_path: Path) -> bool:
    try:
        cred = run(runtime.command(["munge", "-n", "-S", str(socket_path)]), timeout=10, check=False)
        if cred.returncode != 0:
            return False
        back = run(
            runtime.command(["unmunge", "-S", str(socket_path)]),
            timeout=10,
            check=False,
            input_text=cred.stdout,
        )
    except DevstackError:
        return False
    return back.returncode == 0


class SlurmCluster:
    """A one-node Slurm cluster with slurmrestd (JWT auth), owned by this object.

    ``workdir`` is a scratch directory of the caller's. When it is not reachable by
    unprivileged users (pytest's ``tmp_path`` sits under a 0700 directory), the cluster's tree is
    created under ``/var/tmp/slurmproxy-devstack/clusters/<name>`` instead, ``<workdir>/cluster``
    links to it, and it is removed at :meth:`stop` (logs are copied back to ``<workdir>/slurm-logs``).
    :attr:`workdir` is always the directory really used.

    ``accounting=True`` adds MariaDB and slurmdbd, ``AccountingStorageEnforce=<enforce>`` and the
    cluster registered in slurmdbd; ``accounts`` maps accounts to the users associated with them
    before slurmctld starts (a user's first account is the default one). ``min_job_age`` is
    slurm.conf's MinJobAge (how long a finished job stays in slurmctld); ``dbd_extra_conf`` lines
    are appended to slurmdbd.conf (e.g. ``PrivateData=jobs``).
    """

    def __init__(
        self,
        workdir: Path | str,
        generation: Generation = "22.05",
        *,
        partitions: Sequence[Partition] = DEFAULT_PARTITIONS,
        unix_socket: bool = True,
        cpus: int | None = None,
        start_timeout: float = 90.0,
        chroot: Path | None = None,
        extra_conf: Sequence[str] = (),
        message_timeout: int = 5,
        accounting: bool = False,
        accounts: Mapping[str, Sequence[str]] | None = None,
        enforce: str = "associations,limits,qos",
        min_job_age: int = 600,
        dbd_extra_conf: Sequence[str] = (),
    ) -> None:
        if generation not in GENERATIONS:
            raise ValueError(f"unknown Slurm generation {generation!r}")
        self.generation: Generation = generation
        self.name = "ds" + secrets.token_hex(4)
        self._given_dir = Path(workdir).absolute()
        self._partitions = tuple(partitions)
        if not any(p.default for p in self._partitions):
            raise ValueError("one partition must be the default")
        self._want_unix_socket = unix_socket
        self.cpus = cpus or os.cpu_count() or 1
        self._start_timeout = start_timeout
        self._chroot_override = chroot
        self._extra_conf = tuple(extra_conf)
        self._message_timeout = message_timeout
        if accounts and not accounting:
            raise ValueError("accounts need accounting=True")
        self.accounting = accounting
        self._accounts = {name: tuple(users) for name, users in (accounts or {}).items()}
        self._enforce = enforce
        self._min_job_age = min_job_age
        self._dbd_extra_conf = tuple(dbd_extra_conf)
        self._mariadb: MariaDB | None = None
        self._runtime: Runtime | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._munge_socket: Path | None = None
        self._workdir: Path | None = None
        self._own_tree = False
        self._started = False
        self._api_versions: list[str] = []
        self._slurmdb_versions: list[str] = []
        self._own_token: tuple[str, float] | None = None
        self.startup_seconds = 0.0
        self.ctld_port = 0
        self.slurmd_port = 0
        self.restd_port = 0
        self.dbd_port = 0

    # ------------------------------------------------------------------ properties
    @property
    def workdir(self) -> Path:
        """The directory holding this cluster's configuration, state, logs and job directories."""
        if self._workdir is None:
            raise DevstackError("cluster not started")
        return self._workdir

    @property
    def conf_path(self) -> Path:
        return self.workdir / "slurm.conf"

    @property
    def jwt_key_path(self) -> Path:
        """The HS256 key (32 random bytes, owner slurm, 0600) slurmctld verifies tokens with."""
        return self.workdir / "jwt_hs256.key"

    @property
    def slurm_user(self) -> str:
        return SLURM_USER

    @property
    def url(self) -> str:
        """slurmrestd's base URL, ``http://127.0.0.1:<port>`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.restd_port}"

    @property
    def unix_socket(self) -> Path | None:
        """slurmrestd's unix socket (connectable by root), if ``unix_socket=True``."""
        if not self._want_unix_socket:
            return None
        return self.workdir / "restd" / "slurmrestd.sock"

    @property
    def api_versions(self) -> list[str]:
        """OpenAPI versions slurmrestd serves, e.g. ``["v0.0.38"]`` (read from ``/openapi/v3``)."""
        return list(self._api_versions)

    @property
    def slurmdb_versions(self) -> list[str]:
        """Versions of ``/slurmdb/<version>/...`` slurmrestd serves (empty without accounting)."""
        return list(self._slurmdb_versions)

    @property
    def log_dir(self) -> Path:
        return self.workdir / "log"

    @property
    def marker(self) -> str:
        """``KEY=value`` put into every process's environment this cluster starts."""
        return f"{MARKER_ENV}={self.name}"

    def log_paths(self) -> list[Path]:
        return sorted(self.log_dir.glob("*.log")) if self._workdir else []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> SlurmCluster:
        """Start all daemons; return when sinfo shows the node idle and slurmrestd answers."""
        if self._started:
            return self
        last: DevstackError | None = None
        for _attempt in range(3):
            try:
                self._start_once()
                self._started = True
                return self
            except DevstackError as exc:
                last = exc
                logs = " ".join(tail(p, 60) for p in self.log_paths()) if self._workdir else ""
                self.stop()
                if "Address already in use" not in (str(exc) + logs):
                    raise
        assert last is not None
        raise last

    def _start_once(self) -> None:
        t0 = time.monotonic()
        self.name = "ds" + secrets.token_hex(4)
        self._munge_socket = None
        self._own_token = None
        self._runtime = self._make_runtime()
        self._prepare_tree()
        self.ctld_port = free_port()
        self.slurmd_port = free_port()
        self.restd_port = free_port()
        self.dbd_port = free_port() if self.accounting else 0
        self._write_conf()
        self._start_watchdog()
        self._runtime.prepare(self)
        self._start_munge()
        if self.accounting:
            self._start_accounting()
        self.start_slurmctld()
        self._start_slurmd()
        self.start_slurmrestd()
        self._api_versions, self._slurmdb_versions = self._read_api_versions()
        self.startup_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Stop every process this cluster started. Safe to call twice, and after a failed start."""
        if self._workdir is None:
            return
        with contextlib.suppress(DevstackError):
            self._cancel_all_jobs()
        for name in ("slurmrestd", "slurmd", "slurmctld", "slurmdbd"):
            self._stop_proc(name, grace=5)
        if self._mariadb is not None:
            self._mariadb.stop()
            self._mariadb = None
        self._kill_job_leftovers()
        for name in ("munged", "nsholder"):
            self._stop_proc(name, grace=5)
        self._stop_proc("watchdog", grace=2)
        kill_marked(self.marker)
        if self._runtime is not None:
            self._runtime.cleanup(self)
        self._procs.clear()
        self._started = False
        if self._own_tree:
            self._drop_own_tree()

    def adopt_process(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        """Make ``proc`` one of this cluster's processes, stopped by :meth:`stop`."""
        self._procs[name] = proc

    # ------------------------------------------------------------------ fault controls
    def stop_slurmrestd(self) -> None:
        self._stop_proc("slurmrestd", grace=5)

    def kill_slurmrestd(self) -> None:
        """SIGKILL slurmrestd (no cleanup on its side)."""
        proc = self._procs.get("slurmrestd")
        if proc is not None:
            terminate(proc.pid, grace=5, sig=signal.SIGKILL)
            proc.wait(timeout=5)
            self._procs.pop("slurmrestd", None)

    def pause_slurmrestd(self) -> None:
        """SIGSTOP slurmrestd: connections are still accepted by the kernel but never answered."""
        proc = self._procs.get("slurmrestd")
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGSTOP)

    def resume_slurmrestd(self) -> None:
        """SIGCONT slurmrestd after :meth:`pause_slurmrestd`; requests it held are then answered."""
        proc = self._procs.get("slurmrestd")
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)

    def start_slurmrestd(self) -> None:
        """(Re)start slurmrestd on the same port; returns when ``GET /openapi/v3`` answers."""
        assert self._runtime is not None
        if self._proc_alive("slurmrestd"):
            return
        restd_dir = self.workdir / "restd"
        listen = [f"127.0.0.1:{self.restd_port}"]
        sock = self.unix_socket
        if sock is not None:
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            listen.append(f"unix:{sock}")
        argv = self._runtime.as_user(
            RESTD.uid,
            ["slurmrestd", "-a", "rest_auth/jwt", *self._runtime.restd_plugins(self.accounting), *listen],
        )
        env = self._env(SLURM_JWT="daemon", HOME=str(restd_dir))
        log = self.log_dir / "slurmrestd.log"
        self._procs["slurmrestd"] = spawn(argv, log, env)
        wait_until(
            lambda: self._http_status("/openapi/v3") == 200,
            timeout=self._start_timeout,
            what="slurmrestd to answer GET /openapi/v3",
            logs=[log],
            alive=lambda: self._dead_message("slurmrestd"),
        )

    def stop_slurmctld(self) -> None:
        self._stop_proc("slurmctld", grace=10)

    def start_slurmctld(self) -> None:
        """(Re)start slurmctld with its saved state; returns when ``scontrol ping`` says UP."""
        assert self._runtime is not None
        if self._proc_alive("slurmctld"):
            return
        log = self.log_dir / "slurmctld.log"
        argv = self._runtime.command(["slurmctld", "-D", "-f", str(self.conf_path)])
        self._procs["slurmctld"] = spawn(argv, self.log_dir / "slurmctld.stdout.log", self._env())
        wait_until(
            self._ctld_up,
            timeout=self._start_timeout,
            what="slurmctld to answer scontrol ping",
            interval=0.2,
            logs=[log, self.log_dir / "slurmctld.stdout.log"],
            alive=lambda: self._dead_message("slurmctld"),
        )

    def stop_slurmdbd(self) -> None:
        self._stop_proc("slurmdbd", grace=10)

    def start_slurmdbd(self) -> None:
        """(Re)start slurmdbd; returns when ``sacctmgr list cluster`` gets an answer from it."""
        assert self._runtime is not None
        if not self.accounting:
            raise DevstackError("this cluster has no accounting (SlurmCluster(accounting=True))")
        if self._proc_alive("slurmdbd"):
            return
        argv = self._runtime.command(["slurmdbd", "-D"])
        self._procs["slurmdbd"] = spawn(argv, self.log_dir / "slurmdbd.stdout.log", self._env())
        last: list[str] = [""]

        def answers() -> bool:
            out = self.slurm_cmd(["sacctmgr", "-nP", "list", "cluster"], timeout=15, check=False)
            last[0] = out.stdout + out.stderr
            return out.returncode == 0

        try:
            wait_until(
                answers,
                timeout=self._start_timeout,
                what="slurmdbd to answer sacctmgr list cluster",
                interval=0.2,
                logs=[
                    self.log_dir / "slurmdbd.log",
                    self.log_dir / "slurmdbd.stdout.log",
                    self.log_dir / "mariadb.log",
                ],
                alive=lambda: self._dead_message("slurmdbd"),
            )
        except DevstackError as exc:
            raise DevstackError(f"{exc}\nlast sacctmgr output: {last[0][-2000:]}") from None

    # ------------------------------------------------------------------ accounting (slurmdbd)
    def sacctmgr(self, argv: Sequence[str], timeout: float = 30) -> str:
        """Run ``sacctmgr -i <argv>`` as root (an accounting administrator); its stdout."""
        self._need_accounting()
        return self.slurm_cmd(["sacctmgr", "-i", *argv], timeout=timeout).stdout

    def add_account(self, account: str, *, parent: str | None = None, description: str | None = None) -> None:
        """Create an account in this cluster (under ``root``, or ``parent``)."""
        argv = ["add", "account", account, f"Cluster={self.name}"]
        argv.append(f"Description={description or account}")
        argv.append(f"Organization={account}")
        if parent:
            argv.append(f"Parent={parent}")
        self.sacctmgr(argv)

    def add_user(self, user: str, account: str, *, default: bool = False) -> None:
        """Associate ``user`` with ``account``; returns once slurmctld knows the association.

        A user's first association's account is the user's default account; ``default=True``
        makes ``account`` the default of a user who already has one.
        """
        self.sacctmgr(["add", "user", user, f"Account={account}", f"Cluster={self.name}"])
        if default:
            self.sacctmgr(["modify", "user", user, "set", f"DefaultAccount={account}"])
        if self._proc_alive("slurmctld"):
            self._wait_ctld_association(user, account, present=True)

    def remove_user(self, user: str, account: str | None = None) -> None:
        """Remove ``user``'s association with ``account`` (or all of them); waits for slurmctld."""
        argv = ["delete", "user", user, f"Cluster={self.name}"]
        if account:
            argv.append(f"Account={account}")
        self.sacctmgr(argv)
        if self._proc_alive("slurmctld"):
            self._wait_ctld_association(user, account, present=False)

    def associations(self) -> list[dict[str, str]]:
        """slurmdbd's associations of this cluster: ``{"account", "user", "partition", "default"}`` each.

        Account-only associations have ``user == ""``; ``default`` is the user's default account.
        """
        out = self.sacctmgr(
            ["-nP", "show", "associations", f"cluster={self.name}", "format=account,user,partition"]
        ).splitlines()
        defaults = {}
        for line in self.sacctmgr(["-nP", "show", "user", "format=user,defaultaccount"]).splitlines():
            if "|" in line:
                name, default = line.split("|", 1)
                defaults[name] = default
        rows = []
        for line in out:
            if line.count("|") != 2:
                continue
            account, user, partition = line.split("|")
            rows.append({"account": account, "user": user, "partition": partition, "default": defaults.get(user, "")})
        return rows

    def _need_accounting(self) -> None:
        if not self.accounting:
            raise DevstackError("this cluster has no accounting (SlurmCluster(accounting=True))")

    def _wait_ctld_association(self, user: str, account: str | None, present: bool) -> None:
        """slurmdbd pushes association changes to slurmctld asynchronously; wait until they arrived."""

        def arrived() -> bool:
            argv = ["scontrol", "show", "assoc_mgr", f"users={user}", "flags=assoc"]
            if account:
                argv.insert(4, f"accounts={account}")
            out = self.slurm_cmd(argv, timeout=15, check=False).stdout
            there = re.search(rf"\bUserName={re.escape(user)}\(", out) is not None
            return there == present

        wait_until(
            arrived,
            timeout=30,
            what=f"slurmctld to {'learn' if present else 'forget'} {user}'s association with {account or 'any'}",
            interval=0.1,
            logs=[self.log_dir / "slurmctld.log", self.log_dir / "slurmdbd.log"],
        )

    def _accounting_conf(self) -> list[str]:
        if not self.accounting:
            return ["AccountingStorageType=accounting_storage/none"]
        return [
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=localhost",
            f"AccountingStoragePort={self.dbd_port}",
            f"AccountingStorageEnforce={self._enforce}",
            # The persistent connection to slurmdbd authenticates with this munge socket, not
            # with AuthInfo's.
            f"AccountingStoragePass={self._munge_socket_path_for_conf()}",
        ]

    def _start_accounting(self) -> None:
        """MariaDB, slurmdbd, the cluster and the constructor's accounts, before slurmctld starts."""
        self._mariadb = MariaDB(self.workdir / "mariadb", self.log_dir / "mariadb.log", self._env())
        self._mariadb.start()
        self._write_slurmdbd_conf(self._mariadb)
        self.start_slurmdbd()
        self.sacctmgr(["add", "cluster", self.name])
        for account, users in self._accounts.items():
            self.add_account(account)
            for user in users:
                self.add_user(user, account)

    def _write_slurmdbd_conf(self, db: MariaDB) -> None:
        w = self.workdir
        lines = [
            "AuthType=auth/munge",
            "AuthAltTypes=auth/jwt",
            f"AuthAltParameters=jwt_key={self.jwt_key_path}",
            "DbdHost=localhost",
            "DbdAddr=127.0.0.1",
            f"DbdPort={self.dbd_port}",
            f"SlurmUser={SLURM_USER}",
            "DebugLevel=info",
            f"LogFile={w / 'log' / 'slurmdbd.log'}",
            f"PidFile={w / 'run' / 'slurmdbd.pid'}",
            f"MessageTimeout={self._message_timeout}",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={db.port}",
            "StorageUser=slurm",
            f"StoragePass={db.password}",
            "StorageLoc=slurm_acct_db",
            f"StorageParameters=SSL_CA={db.tls_ca}",
            *self._dbd_extra_conf,
        ]
        sock = self._munge_socket_path_for_conf()
        if sock is not None:
            lines.insert(1, f"AuthInfo=socket={sock}")
        path = w / "slurmdbd.conf"
        slurm = pwd.getpwnam(SLURM_USER)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        os.chown(path, slurm.pw_uid, slurm.pw_gid)

    # ------------------------------------------------------------------ Slurm-side helpers
    def slurm_cmd(
        self, argv: Sequence[str], timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (``sinfo``, ``scontrol``...) as root against this cluster."""
        assert self._runtime is not None
        return run(self._runtime.command(argv), env=self._env(), timeout=timeout, check=check)

    def mint_token(self, user: str, lifespan: int = 1800) -> str:
        """A Slurm JWT for ``user`` from ``scontrol token`` (as root, so any user name works)."""
        out = self.slurm_cmd(["scontrol", "token", f"username={user}", f"lifespan={lifespan}"]).stdout
        match = re.search(r"SLURM_JWT=(\S+)", out)
        if not match:
            raise DevstackError("scontrol token printed no SLURM_JWT")
        return match.group(1)

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job -o <id>`` as a dict (``JobState``, ``UserId``, ``StdOut``, ``WorkDir``...).

        Values are strings as scontrol prints them, e.g. ``UserId`` is ``"alice(2001)"``.
        Raises DevstackError if slurmctld does not know the job.
        """
        out = self.slurm_cmd(["scontrol", "show", "job", "-o", str(job_id)]).stdout.strip()
        if not out:
            raise DevstackError(f"job {job_id} not found")
        return parse_scontrol_line(out.splitlines()[0])

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (pending, running and recently finished)."""
        out = self.slurm_cmd(["scontrol", "show", "job", "-o"], check=False)
        if out.returncode != 0 or out.stdout.strip().startswith("No jobs"):
            return []
        return [parse_scontrol_line(line) for line in out.stdout.splitlines() if line.strip()]

    def wait_job(
        self,
        job_id: int | str,
        states: Iterable[str] = FINISHED_STATES,
        timeout: float = 60,
    ) -> dict[str, str]:
        """Wait until the job's state is one of ``states``; return its :meth:`job` dict."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        last: dict[str, str] = {}
        while True:
            with contextlib.suppress(DevstackError):
                last = self.job(job_id)
                if last.get("JobState") in wanted:
                    return last
            if time.monotonic() > deadline:
                raise DevstackError(
                    f"job {job_id} not in {sorted(wanted)} after {timeout} s (last: {last.get('JobState')})\n"
                    + tails(self.log_paths(), 15)
                )
            time.sleep(0.2)

    def wait_job_gone(self, job_id: int | str, timeout: float | None = None) -> None:
        """Wait until slurmctld has purged a finished job (``MinJobAge`` after it ended).

        slurmctld purges in its background loop, so this takes up to about 10 s more than
        ``min_job_age`` here. The default timeout is ``min_job_age + 60``.
        """
        limit = self._min_job_age + 60 if timeout is None else timeout

        def gone() -> bool:
            out = self.slurm_cmd(["scontrol", "show", "job", "-o", str(job_id)], timeout=15, check=False)
            return out.returncode != 0 and "Invalid job id" in (out.stdout + out.stderr)

        wait_until(gone, timeout=limit, what=f"slurmctld to purge job {job_id}", interval=0.5, logs=self.log_paths())

    def diag(self) -> dict[str, int]:
        """RPC counts per message type from ``sdiag`` (e.g. ``{"REQUEST_SUBMIT_BATCH_JOB": 3}``).

        Also ``"total"``, and per-user counts under ``"user:<name>"``. Counters reset with
        :meth:`reset_diag` (``sdiag -r``) or a slurmctld restart.
        """
        return parse_sdiag(self.slurm_cmd(["sdiag"]).stdout)

    def reset_diag(self) -> None:
        self.slurm_cmd(["sdiag", "-r"])

    def job_dir(self, user: str) -> Path:
        """``<workdir>/jobs/<user>``: owned by ``user``, mode 0700, for jobs' working directories."""
        entry = pwd.getpwnam(user)
        jobs = self.workdir / "jobs"
        jobs.mkdir(mode=0o755, exist_ok=True)
        jobs.chmod(0o755)
        path = jobs / user
        path.mkdir(mode=0o700, exist_ok=True)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o700)
        return path

    # ------------------------------------------------------------------ internals
    def _make_runtime(self) -> Runtime:
        if self.generation == "22.05":
            return _HostRuntime()
        from .chroot import ChrootRuntime, spec_for

        return ChrootRuntime(spec_for(self.generation), self._chroot_override)

    def _prepare_tree(self) -> None:
        given = self._given_dir
        given.mkdir(parents=True, exist_ok=True)
        if _traversable_by_others(given):
            self._workdir = given / f"slurm-{self.name}"
            self._own_tree = False
        else:
            SHARED_TMP_BASE.mkdir(parents=True, exist_ok=True)
            for parent in (SHARED_TMP_BASE, *SHARED_TMP_BASE.parents):
                if parent == Path("/"):
                    break
                mode = parent.stat().st_mode
                if not mode & stat.S_IXOTH:
                    parent.chmod(mode | stat.S_IXOTH | stat.S_IROTH)
            _reap_stale_trees()
            self._workdir = SHARED_TMP_BASE / self.name
            self._own_tree = True
            link = given / "cluster"
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(self._workdir)
        w = self._workdir
        w.mkdir(mode=0o755)
        slurm = pwd.getpwnam(SLURM_USER)
        for sub, owner, mode in (
            ("state", slurm, 0o700),
            ("spool", None, 0o755),
            ("log", slurm, 0o755),
            ("run", slurm, 0o755),
            ("munge", None, 0o755),
            ("jobs", None, 0o755),
            ("restd", pwd.getpwuid(RESTD.uid), 0o755),
        ):
            path = w / sub
            path.mkdir(mode=mode)
            path.chmod(mode)
            if owner is not None:
                os.chown(path, owner.pw_uid, owner.pw_gid)
        key = self.jwt_key_path
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
        os.chown(key, slurm.pw_uid, slurm.pw_gid)

    def _write_conf(self) -> None:
        w = self.workdir
        assert self._runtime is not None
        lines = [
            f"ClusterName={self.name}",
            "SlurmctldHost=localhost",
            f"SlurmUser={SLURM_USER}",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "AuthAltTypes=auth/jwt",
            f"AuthAltParameters=jwt_key={self.jwt_key_path}",
            f"StateSaveLocation={w / 'state'}",
            f"SlurmdSpoolDir={w / 'spool'}",
            f"SlurmctldPidFile={w / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={w / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={w / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={w / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            *self._accounting_conf(),
            "SlurmdParameters=config_overrides",
            f"MessageTimeout={self._message_timeout}",
            "TCPTimeout=2",
            "KillWait=2",
            f"MinJobAge={self._min_job_age}",
            "InactiveLimit=0",
            "SlurmdTimeout=300",
            "SchedulerParameters=defer_batch=0,sched_min_interval=0,bf_interval=5",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN",
        ]
        if self._munge_socket_path_for_conf() is not None:
            lines.insert(6, f"AuthInfo=socket={self._munge_socket_path_for_conf()}")
        for part in self._partitions:
            lines.append(
                f"PartitionName={part.name} Nodes=localhost Default={'YES' if part.default else 'NO'} "
                f"MaxTime={part.max_time} State=UP"
            )
        lines.extend(self._extra_conf)
        self.conf_path.write_text("\n".join(lines) + "\n")
        self.conf_path.chmod(0o644)

    def _munge_socket_path_for_conf(self) -> Path | None:
        """The munge socket to name in slurm.conf; decided before munged is started."""
        assert self._runtime is not None
        if self._munge_socket is None:
            reusable = self._runtime.reusable_munge_socket()
            self._munge_socket = reusable or (self.workdir / "munge" / "munge.socket.2")
        return self._munge_socket

    def _start_watchdog(self) -> None:
        """A helper that kills this cluster's processes if this Python process dies without stop()."""
        env = {
            "PATH": _SAFE_PATH,
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        argv = [sys.executable, "-m", "devstack._watchdog", str(os.getpid()), self.marker]
        self._procs["watchdog"] = spawn(argv, self.log_dir / "watchdog.log", env)

    def _start_munge(self) -> None:
        assert self._runtime is not None and self._munge_socket is not None
        if self._munge_socket != self.workdir / "munge" / "munge.socket.2":
            return  # the host's munged answered: reuse it
        m = self.workdir / "munge"
        log = self.log_dir / "munged.log"
        argv = self._runtime.command(
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self._munge_socket}",
                f"--key-file={self._runtime.munge_key()}",
                f"--pid-file={m / 'munged.pid'}",
                f"--seed-file={m / 'munged.seed'}",
                f"--log-file={log}",
                "--num-threads=2",
            ]
        )
        self._procs["munged"] = spawn(argv, self.log_dir / "munged.stdout.log", self._env())
        runtime = self._runtime
        sock = self._munge_socket
        wait_until(
            lambda: _munge_roundtrip(runtime, sock),
            timeout=30,
            what="munged to answer munge -n | unmunge",
            logs=[log, self.log_dir / "munged.stdout.log"],
            alive=lambda: self._dead_message("munged"),
        )

    def _start_slurmd(self) -> None:
        assert self._runtime is not None
        argv = self._runtime.command(["slurmd", "-D", "-N", "localhost", "-f", str(self.conf_path)])
        self._procs["slurmd"] = spawn(argv, self.log_dir / "slurmd.stdout.log", self._env())
        wait_until(
            self._node_idle,
            timeout=self._start_timeout,
            what="sinfo to show node localhost idle",
            interval=0.2,
            logs=[self.log_dir / "slurmd.log", self.log_dir / "slurmd.stdout.log", self.log_dir / "slurmctld.log"],
            alive=lambda: self._dead_message("slurmd") or self._dead_message("slurmctld"),
        )

    def _ctld_up(self) -> bool:
        out = self.slurm_cmd(["scontrol", "ping"], timeout=15, check=False)
        return out.returncode == 0 and "UP" in out.stdout

    def _node_idle(self) -> bool:
        out = self.slurm_cmd(["sinfo", "-h", "-N", "-n", "localhost", "-o", "%T"], timeout=15, check=False)
        return out.returncode == 0 and out.stdout.strip().split("\n")[0].rstrip("*~#$@") == "idle"

    def _env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": _SAFE_PATH,
            "SLURM_CONF": str(self.conf_path),
            "LANG": "C.UTF-8",
            MARKER_ENV: self.name,
        }
        env.update(extra)
        return env

    def _proc_alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def _dead_message(self, name: str) -> str | None:
        proc = self._procs.get(name)
        if proc is None or proc.poll() is None:
            return None
        return f"{name} exited with status {proc.returncode}"

    def _stop_proc(self, name: str, grace: float) -> None:
        proc = self._procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            terminate(proc.pid, grace=grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def _auth_headers(self) -> dict[str, str]:
        """Headers of a short-lived SlurmUser token, for the harness's own slurmrestd requests."""
        now = time.monotonic()
        if self._own_token is None or now > self._own_token[1]:
            self._own_token = (self.mint_token(SLURM_USER, 600), now + 300)
        return {"X-SLURM-USER-NAME": SLURM_USER, "X-SLURM-USER-TOKEN": self._own_token[0]}

    def _http_status(self, path: str) -> int:
        try:
            req = urllib.request.Request(self.url + path, headers=self._auth_headers())
            with urllib.request.urlopen(req, timeout=5) as resp:
                status: int = resp.status
                return status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (OSError, ValueError):
            return 0

    def _read_api_versions(self) -> tuple[list[str], list[str]]:
        """The ``/slurm/...`` and ``/slurmdb/...`` versions named in ``/openapi/v3``, oldest first."""
        req = urllib.request.Request(self.url + "/openapi/v3", headers=self._auth_headers())
        with urllib.request.urlopen(req, timeout=30) as resp:
            doc: dict[str, Any] = json.load(resp)
        found: dict[str, set[str]] = {"slurm": set(), "slurmdb": set()}
        for path in doc.get("paths", {}):
            if m := re.match(r"^/(slurm|slurmdb)/(v\d+\.\d+\.\d+)/", path):
                found[m.group(1)].add(m.group(2))

        def ordered(versions: set[str]) -> list[str]:
            return sorted(versions, key=lambda v: tuple(int(x) for x in v[1:].split(".")))

        return ordered(found["slurm"]), ordered(found["slurmdb"])

    def _cancel_all_jobs(self) -> None:
        if not self._proc_alive("slurmctld"):
            return
        jobs = [j for j in self.jobs() if j.get("JobState") not in FINISHED_STATES]
        if not jobs:
            return
        self.slurm_cmd(["scancel", *(j["JobId"] for j in jobs)], timeout=15, check=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(j.get("JobState") in FINISHED_STATES for j in self.jobs()):
                return
            time.sleep(0.2)

    def _kill_job_leftovers(self) -> None:
        """Kill slurmstepd (marked) and any process still working inside this cluster's tree."""
        kill_marked(self.marker)
        if self._workdir is None:
            return
        root = str(self._workdir)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd == root or cwd.startswith(root + "/"):
                terminate(int(entry), grace=2)

    def _drop_own_tree(self) -> None:
        w = self._workdir
        if w is None or not w.exists():
            return
        logs = self._given_dir / "slurm-logs"
        with contextlib.suppress(OSError):
            if logs.exists():
                shutil.rmtree(logs)
            shutil.copytree(w / "log", logs)
        shutil.rmtree(w, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self._given_dir / "cluster").unlink()


def _traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


def _reap_stale_trees(max_age: float = 6 * 3600) -> None:
    """Remove trees of clusters that died without stop() (no live process carries their marker)."""
    from ._proc import pids_with_env

    now = time.time()
    with contextlib.suppress(OSError):
        for tree in SHARED_TMP_BASE.iterdir():
            with contextlib.suppress(OSError):
                if now - tree.stat().st_mtime < max_age:
                    continue
                if pids_with_env(f"{MARKER_ENV}={tree.name}"):
                    continue
                shutil.rmtree(tree, ignore_errors=True)


_SCONTROL_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")


def parse_scontrol_line(line: str) -> dict[str, str]:
    """Parse one ``scontrol show ... -o`` line (``Key=Value Key2=Value with spaces ...``)."""
    matches = list(_SCONTROL_KEY.finditer(line))
    out: dict[str, str] = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        out[m.group(1)] = line[m.end() : end].strip()
    return out


def parse_sdiag(text: str) -> dict[str, int]:
    """RPC counts per message type (and ``user:<name>``) from ``sdiag``'s text output."""
    counts: dict[str, int] = {}
    section = ""
    total = 0
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Remote Procedure Call statistics by message type"):
            section = "type"
            continue
        if line.startswith("Remote Procedure Call statistics by user"):
            section = "user"
            continue
        if line.startswith(("Pending RPC", "Remote Procedure Call statistics by")):
            section = ""
            continue
        m = re.match(r"^(\S+)\s*\(\s*\d+\)\s+count:(\d+)", line)
        if not m or not section:
            continue
        if section == "type":
            counts[m.group(1)] = int(m.group(2))
            total += int(m.group(2))
        else:
            counts[f"user:{m.group(1)}"] = int(m.group(2))
    counts["total"] = total
    return counts


__all__ = [
    "DEFAULT_PARTITIONS",
    "FINISHED_STATES",
    "GENERATIONS",
    "Generation",
    "Partition",
    "SlurmCluster",
    "parse_scontrol_line",
    "parse_sdiag",
]
