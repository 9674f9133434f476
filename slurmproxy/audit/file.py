"""The audit file sink: appends whole lines, rotates by size, and stays correct with several processes.

Every line goes out in one ``write(2)`` on an ``O_APPEND`` descriptor, so lines from different worker
processes never interleave. Rotation renames the file to ``<name>.<UTC time>`` (for example
``audit.log.20261122T021724.484913Z``) and starts a new one. Worker processes coordinate through
``flock(2)`` on ``<name>.lock``: a writer holds it while it checks that its descriptor still names
the current file, checks the size, rotates if the line would not fit, and writes. So no record is
ever written to a file after it was rotated, none is lost when old files are pruned, and no file
grows past ``max_bytes`` (unless one line alone is larger). The lock is held for microseconds (a
stat and a write; a rename when rotating).

Without size rotation (``max_bytes: 0``) no lock is taken, but the writer still notices when
someone else (logrotate without ``copytruncate``) renamed the file, and reopens it.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
from datetime import UTC, datetime
from pathlib import Path

_STAMP = re.compile(r"\d{8}T\d{6}\.\d{6}Z(?:-\d+)?")
_ROTATED = re.compile(r"(?P<stamp>\d{8}T\d{6}\.\d{6}Z(?:-\d+)?|\d+)(?:\.gz)?")
FILE_MODE = 0o640


def rotated_files(path: Path) -> list[Path]:
    """Rotated siblings of ``path``: ours (``<name>.<UTC time>``) and logrotate's (``<name>.N``), maybe ``.gz``."""
    prefix = path.name + "."
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return sorted(
        path.parent / name
        for name in names
        if name.startswith(prefix) and _ROTATED.fullmatch(name[len(prefix) :]) is not None
    )


class AuditFile:
    """One process's handle on the audit file. ``write`` raises OSError when the line cannot be written."""

    def __init__(self, path: Path, *, max_bytes: int = 0, keep: int = 0) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._lock_fd: int | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._reopen()
        assert self._fd is not None
        # Only a regular file is rotated: never rename a device or a pipe (/dev/stdout, a FIFO to a collector).
        if self.max_bytes > 0 and stat.S_ISREG(os.fstat(self._fd).st_mode):
            lock = self.path.with_name(self.path.name + ".lock")
            self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None
        self._identity = None

    def _reopen(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        st = os.fstat(fd)
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)

    def _follow(self) -> int:
        """Our descriptor, reopened first if the path now names another file (rotated by anyone)."""
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if self._fd is None or current != self._identity:
            self._reopen()
        assert self._fd is not None
        return self._fd

    def has_room(self, size: int) -> bool:
        """Whether ``size`` more bytes could be written now: the audit file can be opened, and its
        filesystem is writable and has that much free space (a ``stat`` and an ``fstatvfs``, a few
        microseconds). Not a guarantee: quotas and I/O errors show only when writing."""
        if self._fd is None and self._identity is None:
            return False  # closed
        try:
            fs = os.fstatvfs(self._follow())  # the file the next record goes to (reopened if it was replaced)
        except OSError:
            return False
        return not fs.f_flag & os.ST_RDONLY and fs.f_bavail * fs.f_frsize >= size

    def _append(self, fd: int, line: bytes) -> None:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write ({written} of {len(line)} bytes)")

    def _full(self, fd: int, size: int) -> bool:
        current = os.fstat(fd).st_size
        return current > 0 and current + size > self.max_bytes

    def write(self, line: bytes) -> None:
        if self._lock_fd is None:
            if self._fd is None:
                raise OSError("the audit file is not open")
            self._append(self._follow(), line)
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            fd = self._follow()
            if self._full(fd, len(line)):
                self._rotate()
                fd = self._follow()
            self._append(fd, line)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _rotate(self) -> None:
        now = datetime.now(UTC)
        stamp = now.strftime("%Y%m%dT%H%M%S.") + f"{now.microsecond:06d}Z"
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        n = 0
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.{stamp}-{n}")
        os.rename(self.path, target)
        self._reopen()
        if self.keep > 0:
            ours = [p for p in rotated_files(self.path) if _STAMP.fullmatch(p.name[len(self.path.name) + 1 :])]
            for old in ours[: max(0, len(ours) - self.keep)]:
                old.unlink(missing_ok=True)
