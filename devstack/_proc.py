"""Process, port and log helpers shared by the devstack components (stdlib only)."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

_PORT_RANGE = (10000, 32000)
"""Below Linux's default ephemeral range (32768-60999), so outgoing connections never take them."""
_ISSUED_PORTS: set[int] = set()


class DevstackError(RuntimeError):
    """A devstack component could not be started or driven; the message quotes its logs."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now, picked at random (not from the kernel's ephemeral range).

    Random picking in a range the kernel does not hand out for outgoing connections keeps
    concurrent test suites on one machine from racing for the same "next free" port.
    """
    for _ in range(500):
        port = random.randint(*_PORT_RANGE)
        if port in _ISSUED_PORTS:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _ISSUED_PORTS.add(port)
        return port
    raise DevstackError("no free TCP port found")


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, or a note that it does not exist."""
    try:
        data = path.read_bytes()
    except OSError:
        return f"[{path}: not found]"
    text = data[-20000:].decode("utf-8", "replace").splitlines()[-lines:]
    return f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text)


def tails(paths: Sequence[Path], lines: int = 30) -> str:
    return "\n".join(tail(p, lines) for p in paths)


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.1,
    logs: Sequence[Path] = (),
    alive: Callable[[], str | None] | None = None,
) -> None:
    """Poll ``predicate`` until it is true; raise DevstackError (with log tails) after ``timeout``.

    ``alive`` may return a message when a process we wait on has died, to fail early.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if alive is not None:
            dead = alive()
            if dead:
                raise DevstackError(f"{what}: {dead}\n{tails(logs)}")
        if time.monotonic() > deadline:
            raise DevstackError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails(logs)}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def terminate(pid: int, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``pid`` and wait up to ``grace`` seconds, then SIGKILL it. Never raises."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.05)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pids_with_env(marker: str) -> list[int]:
    """Pids of processes whose environment contains the exact entry ``marker`` (``KEY=value``).

    Every daemon a devstack component starts gets a unique marker in its environment, which
    its children (slurmstepd, job steps, ...) inherit; this finds leftovers by that marker and
    never matches another instance's processes.
    """
    needle = marker.encode() + b"\0"
    found: list[int] = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if env.startswith(needle) or (b"\0" + needle) in env:
            found.append(int(entry))
    return found


def kill_marked(marker: str, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process carrying ``marker`` in its environment."""
    pids = pids_with_env(marker)
    if not pids:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for pid in pids:
            _reap(pid)
        pids = [p for p in pids if pid_alive(p)]
        if not pids:
            return
        time.sleep(0.05)
    for pid in pids_with_env(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        _reap(pid)


def spawn(
    argv: Sequence[str],
    log: Path,
    env: Mapping[str, str],
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running process in its own session, stdout+stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"=== {time.strftime('%H:%M:%S')} starting {' '.join(argv)}\n".encode())
        out.flush()
        try:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise DevstackError(f"cannot start {argv[0]}: {exc}") from exc


def run(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 30,
    check: bool = True,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a short command, capture its output; DevstackError with its output if it fails."""
    try:
        proc = subprocess.run(
            list(argv),
            env=None if env is None else dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise DevstackError(f"{' '.join(argv)} timed out after {timeout} s") from exc
    except OSError as exc:
        raise DevstackError(f"cannot run {argv[0]}: {exc}") from exc
    if check and proc.returncode != 0:
        raise DevstackError(
            f"{' '.join(argv)} exited {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
        )
    return proc


@contextlib.contextmanager
def flocked(path: Path, timeout: float = 900) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if needed) for the duration of the block."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise DevstackError(f"timed out waiting for lock {path}") from exc
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)
