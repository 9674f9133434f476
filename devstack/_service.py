"""A base for single-server devstack components (Redis, PostgreSQL, nginx, the OTLP collector).

Each server runs as one real process tree on loopback, in its own directory, marked in its
environment with ``SLURMPROXY_DEVSTACK_INSTANCE=<name>`` so that ``stop()`` and ``kill()`` find
its children too (PostgreSQL backends, nginx workers) and never touch another instance. A small
watchdog (``devstack/_watchdog.py``) kills the marked processes if the owning Python process dies
without ``stop()``. Fault controls (``kill``, ``pause``/``resume``, ``restart`` on the same port
with the same data) are the same for every component, so fault tests read alike.

Stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from ._proc import DevstackError, pid_alive, pids_with_env, spawn, tails, terminate

MARKER_ENV = "SLURMPROXY_DEVSTACK_INSTANCE"
SHARED_TMP_BASE = Path("/var/tmp/slurmproxy-devstack")
"""Where trees go that an unprivileged server user must reach when the caller's dir is private."""
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Service:
    """One server process (and its children) owned by this Python process.

    Subclasses set ``kind`` and implement ``_prepare()`` (once, before the first start),
    ``_argv()``, ``_ready()`` and optionally ``_env()``/``_user``/``_stop_signal``.
    """

    kind = "service"
    _stop_signal: int = signal.SIGTERM
    _user: str | None = None
    """Run the server as this Unix user (servers that refuse root, like postgres)."""

    def __init__(self, workdir: Path, *, start_timeout: float = 30.0) -> None:
        self.name = f"{self.kind}-{secrets.token_hex(4)}"
        self.marker = f"{MARKER_ENV}={self.name}"
        self._given_dir = workdir
        self.directory = workdir / self.name
        self._own_tree = False
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._prepared = False
        self._paused = False
        self.startup_seconds = 0.0
        """Wall time of the last start(): process spawned until it answered."""

    # ------------------------------------------------------------------ to override
    def _prepare(self) -> None:
        """Create the config and data (once, before the first start)."""

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """True when the server answers a real request."""
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return {"PATH": SAFE_PATH, "HOME": str(self.directory), "LANG": "C.UTF-8"}

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.kind}.log"

    def _logs(self) -> Sequence[Path]:
        return [self.log_path]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Start the server and return when it answers; DevstackError quoting its log otherwise."""
        if self.running:
            return self
        if not self._prepared:
            self._make_tree()
            self._prepare()
            self._prepared = True
        if self._watchdog is None or self._watchdog.poll() is not None:
            self._start_watchdog()
        started = time.monotonic()
        self._proc = self._spawn(self._argv(), self.log_path)
        self._pidfile.write_text(f"{self._proc.pid} {_start_time(self._proc.pid)}\n")
        deadline = started + self._start_timeout
        while not self._ready():
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise DevstackError(f"{self.kind} exited with {code} while starting\n{tails(self._logs())}")
            if time.monotonic() > deadline:
                self._halt()
                raise DevstackError(
                    f"{self.kind} did not answer within {self._start_timeout:.0f} s\n{tails(self._logs())}"
                )
            time.sleep(0.02)
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Stop the server gracefully (then SIGKILL after a grace period) and its watchdog. Idempotent."""
        self._halt()
        if self._watchdog is not None:
            terminate(self._watchdog.pid, grace=2)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(2)
            self._watchdog = None

    def restart(self) -> Self:
        """Stop and start again: same port, same data, same password."""
        self._halt()
        return self.start()

    def kill(self) -> None:
        """SIGKILL the server and all its children at once, as a crash would. ``start()`` recovers."""
        self._paused = False
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait(10)
            self._proc = None
        _wait_gone(self.marker, 10)

    def pause(self) -> None:
        """SIGSTOP every process of the server: the kernel still accepts connections, nothing answers."""
        self._signal_all(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)
        self._paused = False

    @property
    def _pidfile(self) -> Path:
        """``<pid> <start time>`` of the main process, for the watchdog (pids get reused)."""
        return self.directory / "service.pid"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def close(self) -> None:
        """stop(), then remove the tree if it lives outside the caller's directory."""
        self.stop()
        if self._own_tree:
            shutil.rmtree(self.directory, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self._given_dir / self.name).unlink()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    def _halt(self) -> None:
        if self._paused:
            self.resume()
        tree = self.pids()
        if self._proc is not None:
            terminate(self._proc.pid, grace=10, sig=self._stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            self._proc = None
        for pid in process_tree(self.marker, [p for p in tree if pid_alive(p)]):
            terminate(pid, grace=3)

    def pids(self) -> list[int]:
        """The server's processes: those carrying the marker and all their descendants.

        The main pid and descendants count too because servers that rewrite their process title
        (nginx, PostgreSQL's backends, Redis unless told not to) overwrite the memory that
        /proc/<pid>/environ shows, marker included.
        """
        roots = [self._proc.pid] if self._proc is not None and self._proc.poll() is None else []
        return process_tree(self.marker, roots)

    def _signal_all(self, sig: int) -> None:
        pids = self.pids()
        if not pids:
            raise DevstackError(f"{self.kind} {self.name} is not running")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        env = {**self._env(), MARKER_ENV: self.name}
        if self._user is None:
            return spawn(argv, log, env, cwd=self.directory)
        user = pwd.getpwnam(self._user)
        log.touch()
        os.chown(log, user.pw_uid, user.pw_gid)
        with log.open("ab") as out:
            try:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.directory,
                    start_new_session=True,
                    user=user.pw_uid,
                    group=user.pw_gid,
                    extra_groups=[],
                )
            except OSError as exc:
                raise DevstackError(f"cannot start {argv[0]} as {self._user}: {exc}") from exc

    def run_as_user(self, argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a short command as the server's user, in its directory; DevstackError if it fails."""
        user = pwd.getpwnam(self._user) if self._user else None
        try:
            proc = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**self._env(), MARKER_ENV: self.name},
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                user=None if user is None else user.pw_uid,
                group=None if user is None else user.pw_gid,
                extra_groups=None if user is None else [],
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DevstackError(f"{' '.join(argv)}: {exc}") from exc
        if proc.returncode != 0:
            raise DevstackError(
                f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        return proc

    def _make_tree(self) -> None:
        """``<workdir>/<name>``, or a tree under /var/tmp linked from there when the server's user
        cannot traverse the caller's directory (pytest's /tmp/pytest-of-root is 0700)."""
        self._given_dir.mkdir(parents=True, exist_ok=True)
        if self._user is None or _traversable_by_others(self._given_dir):
            self.directory.mkdir(mode=0o755)
        else:
            base = SHARED_TMP_BASE / self.kind
            base.mkdir(parents=True, exist_ok=True)
            for parent in (base, *base.parents):
                if parent == Path("/"):
                    break
                mode = parent.stat().st_mode
                if not mode & stat.S_IXOTH:
                    parent.chmod(mode | stat.S_IXOTH | stat.S_IROTH)
            _reap_stale_trees(base)
            target = base / self.name
            target.mkdir(mode=0o755)
            (self._given_dir / self.name).symlink_to(target)
            self.directory = target
            self._own_tree = True
        self.directory.chmod(0o755)

    def _start_watchdog(self) -> None:
        env = {
            "PATH": SAFE_PATH,
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        argv = [sys.executable, "-m", "devstack._watchdog", str(os.getpid()), self.marker, str(self._pidfile)]
        self._watchdog = spawn(argv, self.directory / "watchdog.log", env)


def _traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


def process_tree(marker: str, roots: Sequence[int] = ()) -> list[int]:
    """Live pids carrying ``marker`` in their environment, ``roots``, and all their descendants."""
    needle = marker.encode() + b"\0"
    children: dict[int, list[int]] = {}
    marked: list[int] = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(pid)
        if env.startswith(needle) or (b"\0" + needle) in env:
            marked.append(pid)
    found: list[int] = []
    todo = [*marked, *(r for r in roots if pid_alive(r))]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _wait_gone(marker: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p in process_tree(marker) if pid_alive(p)]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    raise DevstackError(f"processes marked {marker} survived SIGKILL")


def _reap_stale_trees(base: Path, max_age: float = 6 * 3600) -> None:
    """Remove trees of instances that died without close() (no live process carries their marker)."""
    now = time.time()
    with contextlib.suppress(OSError):
        for tree in base.iterdir():
            with contextlib.suppress(OSError):
                if now - tree.stat().st_mtime < max_age or pids_with_env(f"{MARKER_ENV}={tree.name}"):
                    continue
                shutil.rmtree(tree, ignore_errors=True)


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def reap(marker: str, pidfile: Path, grace: float = 5.0) -> None:
    """Kill an instance whose owner died: continue paused processes, SIGTERM, then SIGKILL.

    Used by the watchdog. The main pid comes from ``pidfile`` only if its start time still
    matches (the pid was not reused); a SIGSTOPped server would otherwise never see SIGTERM and
    its children (nginx workers, PostgreSQL backends) would stay stopped forever.
    """
    roots: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        pid_text, started = pidfile.read_text().split()
        if _start_time(int(pid_text)) == started:
            roots.append(int(pid_text))
    pids = process_tree(marker, roots)
    for sig in (signal.SIGCONT, signal.SIGTERM):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in process_tree(marker, [p for p in pids if pid_alive(p)]):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
