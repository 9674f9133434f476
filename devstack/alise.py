"""The real ALISE (KIT's account-linking service, ``alise`` 1.1.5 from PyPI) on loopback, offline.

ALISE 1.1.5 needs Python 3.12 or newer: its ``router_api.py`` has an f-string with a backslash in
an expression (PEP 701), a SyntaxError on 3.11. So it gets its own virtualenv, built once by
``python3 -m devstack.alise build`` (devstack/setup.sh runs it) with the first Python >= 3.12 found
on this machine, under ``/var/cache/slurmproxy-devstack/alise-1.1.5`` (or
``$SLURMPROXY_DEVSTACK_CACHE/alise-1.1.5``).

Offline: at import ALISE fetches the OIDC discovery document of every OP in its config. The
external OP is the devstack provider (its ``op_url`` must equal the tokens' ``iss``); the
internal OP has a made-up URL and takes its discovery from the devstack provider too
(``op_config_url``). Linked accounts and API keys are seeded straight into ALISE's SQLite
database, in ALISE's own schema (``alise/models.py``), as its login flow would have stored them.

Stdlib only (``build`` runs before the project's venv exists).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from ._proc import DevstackError, free_port, spawn, tail, terminate

ALISE_VERSION = "1.1.5"
INTERNAL_OP = "https://sso.hpc-site.example/realms/hpc"
_USER_COLUMNS = "(session_id TEXT, identity TEXT, provider TEXT, jsonstr JSON, last_seen INTEGER)"
_SCHEMA = [  # alise/models.py DatabaseUser.SCHEMA
    f"CREATE table if not exists int_user {_USER_COLUMNS}",
    f"CREATE table if not exists ext_user {_USER_COLUMNS}",
    "CREATE table if not exists sites (name TEXT, comment TEXT)",
    "CREATE table if not exists apikeys (ownername TEXT, owneremail TEXT, sub TEXT, iss TEXT, apikey TEXT)",
]


def cache_dir() -> Path:
    base = Path(os.environ.get("SLURMPROXY_DEVSTACK_CACHE", "/var/cache/slurmproxy-devstack"))
    return base / f"alise-{ALISE_VERSION}"


def venv_python() -> Path:
    return cache_dir() / "venv" / "bin" / "python"


def _version_ok(python: str) -> bool:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info >= (3, 12))"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "True"


def find_python() -> str | None:
    """The first Python >= 3.12 here: python3.13/3.12 on PATH, then pyenv's installed versions."""
    candidates = [shutil.which(n) for n in ("python3.13", "python3.12", "python3")]
    pyenv = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{pyenv}/versions/3.1[2-9]*/bin/python3"), reverse=True)
    candidates += sorted(glob.glob("/usr/local/bin/python3.1[2-9]"), reverse=True)
    for python in candidates:
        if python and _version_ok(python):
            return python
    return None


def ready() -> bool:
    stamp = cache_dir() / "stamp"
    return stamp.exists() and stamp.read_text().strip() == ALISE_VERSION and venv_python().exists()


def build() -> Path:
    """Create the ALISE virtualenv once (under a flock; the stamp is written last)."""
    if ready():
        return venv_python()
    root = cache_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".alise-{ALISE_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready():
            return venv_python()
        python = find_python()
        if python is None:
            raise DevstackError(
                f"ALISE {ALISE_VERSION} needs Python >= 3.12 (PEP 701 f-strings in alise/router_api.py); "
                "none found (python3.12, python3.13, pyenv)"
            )
        # No stamp: nothing usable here (or a build that died half-way). Build in place under the lock.
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        pip = [str(venv_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        for argv in (
            [python, "-m", "venv", str(root / "venv")],
            [*pip, f"alise=={ALISE_VERSION}"],
            [str(venv_python()), "-c", "import alise, fastapi, flaat"],
        ):
            _run_logged(argv, root / "build.log")
        (root / "stamp").write_text(ALISE_VERSION + "\n")
    return venv_python()


def _run_logged(argv: list[str], log: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    with log.open("ab") as out:
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if code != 0:
        raise DevstackError(f"building the ALISE venv: {' '.join(argv)} exited with {code}\n{tail(log)}")


class AliseServer:
    """One ALISE on ``127.0.0.1:<port>`` for ``site``, trusting ``issuer`` (the devstack provider)
    as the external OP named ``external_name``. ``apikey`` is seeded; ``link()`` adds linked accounts."""

    def __init__(
        self,
        workdir: Path,
        issuer: str,
        *,
        site: str = "hpc-site",
        external_name: str = "devstack",
        port: int | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.workdir = workdir
        self.issuer = issuer
        self.site = site
        self.external_name = external_name
        self.port = port or free_port()
        self.apikey = secrets.token_hex(16)
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database(self) -> Path:
        return self.workdir / f"alise_{self.site}.db"

    @property
    def log_path(self) -> Path:
        return self.workdir / "alise.log"

    def write_apikey(self, path: Path) -> Path:
        path.write_text(self.apikey + "\n")
        path.chmod(0o600)
        return path

    def _config(self) -> str:
        discovery = f"{self.issuer}/.well-known/openid-configuration"
        return (
            "[messages]\nlog_level = INFO\n\n"
            f"[database]\ndb_name = {self.workdir}/alise\n\n"
            f"[auth.{self.external_name}]\nop_url = {self.issuer}\nclient_id = devstack\n"
            "client_secret = devstack\nscopes = openid profile\n\n"
            f"[auth.{self.site}]\nop_url = {INTERNAL_OP}\nop_config_url = {discovery}\nclient_id = devstack\n"
            "client_secret = devstack\ninternal = True\nscopes = openid profile\nusername_claim = preferred_username\n"
        )

    def _seed(self) -> None:
        with contextlib.closing(sqlite3.connect(self.database)) as db, db:
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute("DELETE FROM apikeys")
            db.execute(
                "INSERT INTO apikeys VALUES (?, ?, ?, ?, ?)", ("admin", "admin@example.org", "admin", "", self.apikey)
            )

    def link(self, subject: str, username: str, *, display_name: str = "") -> None:
        """What ALISE stores when ``subject`` (of the external OP) links the internal account ``username``."""
        session = secrets.token_hex(8)
        now = int(time.time())
        internal = f"{self.site}:int-{username}"
        external = f"{self.external_name}:{subject}"
        int_json = {
            "identity": internal,
            "provider": self.site,
            "generated_username": username,
            "display_name": display_name or username,
        }
        ext_json = {"identity": external, "provider": self.external_name, "display_name": display_name or subject}
        with contextlib.closing(sqlite3.connect(self.database)) as db, db:
            db.execute("DELETE FROM ext_user WHERE identity = ?", (external,))
            db.execute(
                "INSERT INTO int_user VALUES (?, ?, ?, ?, ?)", (session, internal, self.site, json.dumps(int_json), now)
            )
            db.execute(
                "INSERT INTO ext_user VALUES (?, ?, ?, ?, ?)",
                (session, external, self.external_name, json.dumps(ext_json), now),
            )

    def unlink(self, subject: str) -> None:
        with contextlib.closing(sqlite3.connect(self.database)) as db, db:
            db.execute("DELETE FROM ext_user WHERE identity = ?", (f"{self.external_name}:{subject}",))

    def start(self) -> AliseServer:
        python = build()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / ".config").mkdir(exist_ok=True)
        (self.workdir / ".config" / "alise.conf").write_text(self._config())
        self._seed()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir), "NO_PROXY": "*"}
        # PR_SET_PDEATHSIG: ALISE gets SIGTERM when its owner dies without stop() (a crash, a SIGKILL).
        uvicorn = ["-m", "uvicorn", "alise.daemon:app", "--host", "127.0.0.1", "--port", str(self.port)]
        launcher = (
            "import ctypes, os, sys\n"
            "ctypes.CDLL(None).prctl(1, 15)\n"
            f"if os.getppid() != {os.getpid()}: sys.exit(1)\n"
            f"os.execv(sys.executable, [sys.executable, *{uvicorn!r}])\n"
        )
        argv = [str(python), "-c", launcher]
        self._proc = spawn(argv, self.log_path, env, cwd=self.workdir)
        deadline = time.monotonic() + self._start_timeout
        while not self._answers():
            if self._proc.poll() is not None:
                code, self._proc = self._proc.returncode, None
                raise DevstackError(f"ALISE exited with status {code} while starting\n{tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise DevstackError(f"ALISE did not answer in {self._start_timeout} s\n{tail(self.log_path)}")
            time.sleep(0.1)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/version", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                terminate(self._proc.pid, grace=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            self._proc = None

    def __enter__(self) -> AliseServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "build"
    if command == "build":
        print(build())
    elif command == "path":
        print(venv_python())
    else:
        sys.exit(f"usage: python3 -m devstack.alise build|path (not {command!r})")
