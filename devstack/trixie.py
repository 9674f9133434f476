"""Slurm 24.11 from Debian 13 (trixie) in a debootstrap chroot, for the ``"24.11"`` generation.

The chroot is built once into a cache directory (``/var/cache/slurmproxy-devstack/trixie``, or
``$SLURMPROXY_DEVSTACK_CACHE/trixie``) and shared by every cluster on the machine. It is never
modified by a running cluster: each cluster runs its daemons in a private *mount namespace* (held
open by a ``sleep`` process) in which proc, /dev, /sys and the cluster's own directory are mounted
inside the chroot. When the cluster's processes are gone the kernel drops those mounts, so a
crashed test run leaves no mount behind and clusters never see each other's mounts.

The cluster directory is bind-mounted at the *same path* inside the chroot, so every path in
slurm.conf, every job output file and every unix socket has one name on both sides.

Stdlib only: ``setup.sh --trixie`` runs ``python3 -m devstack.trixie build`` without the venv.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ._proc import DevstackError, flocked, pid_alive, run, spawn, terminate
from .users import ALL_USERS

if TYPE_CHECKING:
    from .slurm import Generation, SlurmCluster

PACKAGES = ("slurmctld", "slurmd", "slurmrestd", "munge", "slurm-wlm-jwt-plugin", "slurm-client")
SUITE = "trixie"
STAMP = ".devstack-complete"
STAMP_VERSION = "devstack-trixie-1 " + ",".join(PACKAGES)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
REQUIRED_FILES = (
    "usr/sbin/slurmctld",
    "usr/sbin/slurmd",
    "usr/sbin/slurmrestd",
    "usr/sbin/munged",
    "usr/bin/munge",
    "usr/bin/unmunge",
    "usr/bin/sinfo",
    "usr/bin/scontrol",
    "usr/bin/setpriv",
    "etc/munge/munge.key",
    "etc/hosts",
)
REQUIRED_PLUGINS = ("auth_jwt.so", "rest_auth_jwt.so", "openapi_slurmctld.so", "data_parser_v0_0_42.so")

RESTD_DATA_PARSERS = ("v0.0.40", "v0.0.41", "v0.0.42")
"""Data parsers slurmrestd 24.11 loads; each one serves ``/slurm/<version>/...``."""


def cache_dir() -> Path:
    return Path(os.environ.get("SLURMPROXY_DEVSTACK_CACHE", "/var/cache/slurmproxy-devstack"))


def chroot_path() -> Path:
    return cache_dir() / SUITE


def debian_mirror() -> str:
    """The Debian mirror this machine's own apt sources name (deb822 or one-line format)."""
    candidates: list[str] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        text = Path(path).read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):
            if re.search(r"^Enabled:\s*no", stanza, re.M | re.I):
                continue
            m = re.search(r"^URIs:\s*(.+)$", stanza, re.M)
            if m:
                candidates.extend(m.group(1).split())
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text(errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb":
                    uri = next(p for p in parts[1:] if not p.startswith("["))
                    candidates.append(uri)
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def chroot_problems(root: Path) -> list[str]:
    """What is missing from a chroot for it to run a devstack cluster (empty: complete)."""
    problems: list[str] = []
    try:
        stamp = (root / STAMP).read_text().strip()
    except OSError:
        return [f"{root / STAMP} missing"]
    if stamp != STAMP_VERSION:
        problems.append(f"stamp is {stamp!r}, expected {STAMP_VERSION!r}")
    for rel in REQUIRED_FILES:
        if not (root / rel).exists():
            problems.append(f"{rel} missing")
    plugin_dirs = glob.glob(str(root / "usr/lib/*/slurm-wlm"))
    if not plugin_dirs:
        problems.append("no slurm-wlm plugin directory")
    else:
        for plugin in REQUIRED_PLUGINS:
            if not any((Path(d) / plugin).exists() for d in plugin_dirs):
                problems.append(f"plugin {plugin} missing")
    return problems


def ensure_chroot(root: Path | None = None, timeout: float = 1800) -> Path:
    """Return a complete chroot, building (or rebuilding a broken one) under a lock if needed."""
    root = root or chroot_path()
    if not chroot_problems(root):
        _sync_users(root)
        return root
    with flocked(root.parent / f".{root.name}.lock", timeout=timeout):
        if chroot_problems(root):  # someone else may have built it meanwhile
            _build(root)
        _sync_users(root)
    return root


def _build(root: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise DevstackError("debootstrap is not installed: run devstack/setup.sh")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f"{root.name}.build-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for stale in root.parent.glob(f"{root.name}.build-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    mirror = debian_mirror()
    log = root.parent / f"{root.name}.build.log"
    t0 = time.monotonic()
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(tmp),
        mirror,
    ]
    print(f"devstack: building the Slurm 24.11 chroot in {root} from {mirror} (log: {log})", file=sys.stderr)
    with log.open("w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=1500)
    if proc.returncode != 0:
        _unmount_below(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise DevstackError(f"debootstrap failed ({proc.returncode}); last lines of {log}:\n" + _tail_text(log))
    _unmount_below(tmp)
    shutil.copyfile("/etc/hosts", tmp / "etc/hosts")
    (tmp / "etc/hosts").chmod(0o644)
    # Daemons must never start from package scripts inside the chroot.
    policy = tmp / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    key = tmp / "etc/munge/munge.key"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
    _sync_users(tmp)
    (tmp / STAMP).write_text(STAMP_VERSION + "\n")
    problems = chroot_problems(tmp)
    if problems:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DevstackError("debootstrap finished but the chroot is incomplete: " + "; ".join(problems))
    if root.exists():
        old = root.parent / f"{root.name}.old-{os.getpid()}"
        root.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(root)
    print(f"devstack: chroot ready in {time.monotonic() - t0:.0f} s", file=sys.stderr)


def _tail_text(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _unmount_below(root: Path) -> None:
    """Unmount anything debootstrap left mounted below ``root`` (it mounts proc/sys itself)."""
    prefix = str(root) + "/"
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            target = line.split()[4]
            if target.startswith(prefix):
                mounts.append(target)
    for target in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def _sync_users(root: Path) -> None:
    """Give the chroot the devstack's users and groups, with the host's uids (idempotent)."""
    passwd = root / "etc/passwd"
    group = root / "etc/group"
    have_users = {line.split(":", 1)[0] for line in passwd.read_text().splitlines() if line}
    have_groups = {line.split(":", 1)[0] for line in group.read_text().splitlines() if line}
    add_users = [u for u in ALL_USERS if u.name not in have_users]
    add_groups = [u for u in ALL_USERS if u.name not in have_groups]
    if not add_users and not add_groups:
        return
    with flocked(root.parent / f".{root.name}.users.lock", timeout=120):
        have_users = {line.split(":", 1)[0] for line in passwd.read_text().splitlines() if line}
        have_groups = {line.split(":", 1)[0] for line in group.read_text().splitlines() if line}
        with group.open("a") as fh:
            for u in ALL_USERS:
                if u.name not in have_groups:
                    fh.write(f"{u.name}:x:{u.gid}:\n")
        with passwd.open("a") as fh:
            for u in ALL_USERS:
                if u.name not in have_users:
                    shell = "/usr/sbin/nologin" if u.kind == "daemon" else "/bin/bash"
                    fh.write(f"{u.name}:x:{u.uid}:{u.gid}:slurmproxy devstack {u.kind}:{u.home}:{shell}\n")


class ChrootRuntime:
    """Runs a cluster's daemons inside the trixie chroot, in a private mount namespace."""

    generation: Generation = "24.11"
    restd_plugins: tuple[str, ...] = ("-s", "openapi/slurmctld", "-d", ",".join(RESTD_DATA_PARSERS))

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or chroot_path()
        self._holder: subprocess.Popen[bytes] | None = None
        self._created_dirs: list[Path] = []

    def prepare(self, cluster: SlurmCluster) -> None:
        ensure_chroot(self.root)
        log = cluster.log_dir / "nsholder.log"
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", cluster.marker.split("=", 1)[0]: cluster.name}
        self._holder = spawn(["unshare", "--mount", "--propagation", "private", "--", "sleep", "infinity"], log, env)
        cluster.adopt_process("nsholder", self._holder)
        ns = Path(f"/proc/{self._holder.pid}/ns/mnt")
        deadline = time.monotonic() + 10
        while True:
            # unshare has switched namespaces once its ns link differs from ours.
            with contextlib.suppress(OSError):
                if os.readlink(ns) != os.readlink("/proc/self/ns/mnt"):
                    break
            if self._holder.poll() is not None or time.monotonic() > deadline:
                raise DevstackError("unshare --mount did not start:\n" + _tail_text(log))
            time.sleep(0.01)
        workdir = cluster.workdir
        inside = self.root / str(workdir).lstrip("/")
        self._created_dirs = _mkdirs(inside)
        r = str(self.root)
        for argv in (
            ["mount", "-t", "proc", "proc", f"{r}/proc"],
            ["mount", "--rbind", "/dev", f"{r}/dev"],
            ["mount", "--rbind", "/sys", f"{r}/sys"],
            ["mount", "--bind", str(workdir), str(inside)],
        ):
            run(self._nsenter(argv), timeout=30)

    def _nsenter(self, argv: Sequence[str]) -> list[str]:
        if self._holder is None:
            raise DevstackError("chroot namespace not prepared")
        return ["nsenter", f"--mount=/proc/{self._holder.pid}/ns/mnt", "--", *argv]

    def command(self, argv: Sequence[str]) -> list[str]:
        return self._nsenter(["chroot", str(self.root), *argv])

    def as_user(self, uid: int, argv: Sequence[str]) -> list[str]:
        return self.command(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv])

    def munge_key(self) -> str:
        return "/etc/munge/munge.key"

    def reusable_munge_socket(self) -> Path | None:
        return None  # always a munged of the chroot's own, with the chroot's key

    def cleanup(self, cluster: SlurmCluster) -> None:
        if self._holder is not None:
            if self._holder.poll() is None:
                terminate(self._holder.pid, grace=2)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._holder.wait(timeout=5)
            self._holder = None
        # The mounts lived only in the namespace; remove the empty mount point directories we made.
        for path in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                path.rmdir()
        self._created_dirs = []


def _mkdirs(path: Path) -> list[Path]:
    created: list[Path] = []
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o755)
            created.append(d)
    return created


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("build", "check", "path"):
        print("usage: python3 -m devstack.trixie build|check|path", file=sys.stderr)
        return 2
    root = chroot_path()
    if argv[0] == "path":
        print(root)
        return 0
    if argv[0] == "check":
        problems = chroot_problems(root)
        for problem in problems:
            print(problem)
        return 1 if problems else 0
    t0 = time.monotonic()
    ensure_chroot(root)
    print(f"{root} ready ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
