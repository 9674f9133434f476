"""Newer Slurm generations from Debian's own packages, each in a debootstrap chroot.

``"24.11"`` comes from Debian 13 (trixie), ``"26.05"`` from Debian testing (forky). Each chroot
is built once into a cache directory (``/var/cache/slurmproxy-devstack/<name>``, or
``$SLURMPROXY_DEVSTACK_CACHE/<name>``) and shared by every cluster on the machine. It is never
modified by a running cluster: each cluster runs its daemons in a private *mount namespace* (held
open by a ``sleep`` process) in which proc, /dev, /sys and the cluster's own directory are mounted
inside the chroot. When the cluster's processes are gone the kernel drops those mounts, so a
crashed test run leaves no mount behind and clusters never see each other's mounts.

The cluster directory is bind-mounted at the *same path* inside the chroot, so every path in
slurm.conf, every job output file and every unix socket has one name on both sides.

Stdlib only: ``setup.sh --slurm 26.05`` runs ``python3 -m devstack.chroot build 26.05`` without
the venv.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._proc import DevstackError, flocked, pid_alive, run, spawn, terminate
from .users import ALL_USERS

if TYPE_CHECKING:
    from .slurm import SlurmCluster

STAMP = ".devstack-complete"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
REQUIRED_FILES = (
    "usr/sbin/slurmctld",
    "usr/sbin/slurmd",
    "usr/sbin/slurmrestd",
    "usr/sbin/slurmdbd",
    "usr/sbin/munged",
    "usr/bin/munge",
    "usr/bin/unmunge",
    "usr/bin/sinfo",
    "usr/bin/scontrol",
    "usr/bin/sacctmgr",
    "usr/bin/setpriv",
    "etc/munge/munge.key",
    "etc/hosts",
)
PACKAGES = (
    "slurmctld",
    "slurmd",
    "slurmrestd",
    "slurmdbd",
    "munge",
    "slurm-wlm-jwt-plugin",
    "slurm-client",
)
"""``slurmdbd`` brings ``slurm-wlm-mysql-plugin`` (accounting_storage/mysql) along."""


@dataclass(frozen=True)
class ChrootSpec:
    """One Slurm generation's chroot: which Debian suite, which packages, which plugins it must have.

    ``revision`` is part of the cache directory's name (``<suite>-r<revision>`` from revision 2
    on). Bump it whenever ``packages`` change: a chroot is never rebuilt in place under the name an
    older checkout uses, because that checkout's clusters may be running inside it.
    """

    generation: str
    suite: str
    revision: int
    restd_data_parsers: tuple[str, ...]
    required_plugins: tuple[str, ...]
    packages: tuple[str, ...] = PACKAGES
    script: str | None = None
    """debootstrap's script name when its own has none for ``suite`` (Debian 12's knows no forky)."""

    @property
    def name(self) -> str:
        return self.suite if self.revision == 1 else f"{self.suite}-r{self.revision}"

    @property
    def stamp(self) -> str:
        return f"devstack-{self.suite}-{self.revision} " + ",".join(self.packages)

    @property
    def path(self) -> Path:
        return cache_dir() / self.name


_COMMON_PLUGINS = (
    "auth_jwt.so",
    "rest_auth_jwt.so",
    "openapi_slurmctld.so",
    "openapi_slurmdbd.so",
    "accounting_storage_slurmdbd.so",
    "accounting_storage_mysql.so",
)

SPECS: dict[str, ChrootSpec] = {
    "24.11": ChrootSpec(
        generation="24.11",
        suite="trixie",
        revision=2,
        restd_data_parsers=("v0.0.40", "v0.0.41", "v0.0.42"),
        required_plugins=(*_COMMON_PLUGINS, "data_parser_v0_0_42.so"),
    ),
    "26.05": ChrootSpec(
        generation="26.05",
        suite="forky",
        revision=1,
        restd_data_parsers=("v0.0.42", "v0.0.43", "v0.0.44", "v0.0.45"),
        required_plugins=(*_COMMON_PLUGINS, "data_parser_v0_0_45.so"),
        script="sid",
    ),
}
"""Generations served from a chroot. The data parsers are those the generation's slurmrestd has."""


def spec_for(generation: str) -> ChrootSpec:
    try:
        return SPECS[generation]
    except KeyError:
        raise DevstackError(f"no chroot for Slurm {generation!r} (known: {', '.join(SPECS)})") from None


def cache_dir() -> Path:
    return Path(os.environ.get("SLURMPROXY_DEVSTACK_CACHE", "/var/cache/slurmproxy-devstack"))


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


def chroot_problems(spec: ChrootSpec, root: Path | None = None) -> list[str]:
    """What is missing from a chroot for it to run a devstack cluster (empty: complete)."""
    root = root or spec.path
    problems: list[str] = []
    try:
        stamp = (root / STAMP).read_text().strip()
    except OSError:
        return [f"{root / STAMP} missing"]
    if stamp != spec.stamp:
        problems.append(f"stamp is {stamp!r}, expected {spec.stamp!r}")
    for rel in REQUIRED_FILES:
        if not (root / rel).exists():
            problems.append(f"{rel} missing")
    plugin_dirs = glob.glob(str(root / "usr/lib/*/slurm-wlm"))
    if not plugin_dirs:
        problems.append("no slurm-wlm plugin directory")
    else:
        for plugin in spec.required_plugins:
            if not any((Path(d) / plugin).exists() for d in plugin_dirs):
                problems.append(f"plugin {plugin} missing")
    return problems


def ensure_chroot(spec: ChrootSpec, root: Path | None = None, timeout: float = 1800) -> Path:
    """Return a complete chroot, building (or rebuilding a broken one) under a lock if needed."""
    root = root or spec.path
    if not chroot_problems(spec, root):
        _sync_users(root)
        return root
    with flocked(root.parent / f".{root.name}.lock", timeout=timeout):
        if chroot_problems(spec, root):  # someone else may have built it meanwhile
            _build(spec, root)
        _sync_users(root)
    return root


def _build(spec: ChrootSpec, root: Path) -> None:
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
        f"--include={','.join(spec.packages)}",
        spec.suite,
        str(tmp),
        mirror,
    ]
    if spec.script:
        argv.append(spec.script)
    print(
        f"devstack: building the Slurm {spec.generation} chroot ({spec.suite}) in {root} from {mirror} (log: {log})",
        file=sys.stderr,
    )
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
    (tmp / STAMP).write_text(spec.stamp + "\n")
    problems = chroot_problems(spec, tmp)
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
    """Runs a cluster's daemons inside a generation's chroot, in a private mount namespace."""

    def __init__(self, spec: ChrootSpec, root: Path | None = None) -> None:
        self.spec = spec
        self.generation = spec.generation
        self.root = root or spec.path

    def restd_plugins(self, accounting: bool) -> tuple[str, ...]:
        plugins = "openapi/slurmctld,openapi/slurmdbd" if accounting else "openapi/slurmctld"
        return ("-s", plugins, "-d", ",".join(self.spec.restd_data_parsers))
        self._holder: subprocess.Popen[bytes] | None = None
        self._created_dirs: list[Path] = []

    def prepare(self, cluster: SlurmCluster) -> None:
        ensure_chroot(self.spec, self.root)
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


USAGE = "usage: python3 -m devstack.chroot build|check|path [GENERATION... | all]  (generations: {})"


def main(argv: Sequence[str], default: Sequence[str] = ("all",)) -> int:
    """``build``/``check``/``path`` for the named generations (``all``, the default: every one)."""
    if not argv or argv[0] not in ("build", "check", "path"):
        print(USAGE.format(", ".join(SPECS)), file=sys.stderr)
        return 2
    names = list(argv[1:]) or list(default)
    if "all" in names:
        names = list(SPECS)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        print(f"unknown generation {', '.join(unknown)}; " + USAGE.format(", ".join(SPECS)), file=sys.stderr)
        return 2
    status = 0
    for spec in (SPECS[n] for n in names):
        if argv[0] == "path":
            print(spec.path)
        elif argv[0] == "check":
            problems = chroot_problems(spec)
            for problem in problems:
                print(f"{spec.generation}: {problem}")
            status = status or (1 if problems else 0)
        else:
            t0 = time.monotonic()
            ensure_chroot(spec)
            print(f"Slurm {spec.generation}: {spec.path} ready ({time.monotonic() - t0:.1f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
