"""A real Redis (Debian's ``redis-server`` 7.0) on a free loopback port, with a password and
optionally TLS, for the proxy's shared-state tests.

Never the system instance: each ``RedisServer`` writes its own ``redis.conf`` (loopback only,
``requirepass``, AOF with ``appendfsync always`` in its own data directory) and runs
``redis-server <conf>`` in the foreground. Data survives ``stop()``/``start()``, ``restart()`` and
even ``kill()`` (every write is fsynced to the AOF), so "Redis went away and came back" tests see
their keys again. Redis does not refuse root, so it runs as the caller (root), which also lets it
read a private pytest ``tmp_path``.

Stdlib only (readiness is a RESP ``AUTH`` + ``PING`` over a socket, TLS through ``ssl``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
from pathlib import Path

from ._proc import DevstackError, free_port, run
from ._service import Service
from .certs import CertPair, TestPKI


def resp_command(*args: str) -> bytes:
    """One command in RESP (Redis' wire protocol), as a client sends it."""
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RedisServer(Service):
    """``RedisServer(workdir, tls=False, tls_client_auth=False, port=None, start_timeout=15)``.

    ``url`` carries the password (``redis://:<pw>@127.0.0.1:<port>/0``, ``rediss://`` with TLS);
    ``password_file`` holds the same password alone (0600), as the proxy's settings will read it.
    With ``tls=True`` the port speaks TLS only (``port 0`` + ``tls-port``), with a server
    certificate from a fresh test CA (``ca_cert``); ``tls_client_auth=True`` also requires a
    client certificate (``client_cert``) signed by that CA.
    """

    kind = "redis"

    def __init__(
        self,
        workdir: Path,
        *,
        tls: bool = False,
        tls_client_auth: bool = False,
        port: int | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        super().__init__(workdir, start_timeout=start_timeout)
        if shutil.which("redis-server") is None:
            raise DevstackError("redis-server is not installed: run devstack/setup.sh --redis")
        self.port = port or free_port()
        self.tls = tls or tls_client_auth
        self.tls_client_auth = tls_client_auth
        self.password = secrets.token_urlsafe(24)
        self.pki: TestPKI | None = None
        self.server_cert: CertPair | None = None
        self.client_cert: CertPair | None = None

    # ------------------------------------------------------------------ what tests use
    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def url_without_password(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    @property
    def password_file(self) -> Path:
        return self.directory / "password"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def conf_path(self) -> Path:
        return self.directory / "redis.conf"

    @property
    def ca_cert(self) -> Path:
        if self.pki is None:
            raise DevstackError("this RedisServer has no TLS (or is not started yet)")
        return self.pki.ca_cert

    def cli(self, *args: str, timeout: float = 10) -> str:
        """Run ``redis-cli --raw <args>`` against this server (password through REDISCLI_AUTH)."""
        argv = ["redis-cli", "--raw", "-h", "127.0.0.1", "-p", str(self.port)]
        if self.tls:
            argv += ["--tls", "--cacert", str(self.ca_cert)]
            if self.client_cert is not None:
                argv += ["--cert", str(self.client_cert.cert), "--key", str(self.client_cert.key)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "REDISCLI_AUTH": self.password}
        out = run([*argv, *args], env=env, timeout=timeout).stdout
        return out.rstrip("\n")

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting the test CA (and presenting the client certificate if required)."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        if self.client_cert is not None:
            context.load_cert_chain(self.client_cert.cert, self.client_cert.key)
        return context

    # ------------------------------------------------------------------ Service
    def _prepare(self) -> None:
        self.data_dir.mkdir(mode=0o700)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.password + "\n")
        lines = [
            "bind 127.0.0.1",
            "protected-mode yes",
            "daemonize no",
            'logfile ""',
            "always-show-logo no",
            # proc-title rewriting clobbers /proc/<pid>/environ, where the instance marker is read
            "set-proc-title no",
            f"dir {self.data_dir}",
            'save ""',
            "appendonly yes",
            "appendfsync always",
            f"requirepass {self.password}",
        ]
        if self.tls:
            self.pki = TestPKI(self.directory / "tls")
            self.server_cert = self.pki.server("redis")
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.server_cert.cert}",
                f"tls-key-file {self.server_cert.key}",
                f"tls-ca-cert-file {self.pki.ca_cert}",
                f"tls-auth-clients {'yes' if self.tls_client_auth else 'no'}",
            ]
            if self.tls_client_auth:
                self.client_cert = self.pki.client("slurmproxy")
        else:
            lines.append(f"port {self.port}")
        fd = os.open(self.conf_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines) + "\n")

    def _argv(self) -> list[str]:
        return ["redis-server", str(self.conf_path)]

    def _ready(self) -> bool:
        """AUTH + PING answered ``+OK`` ``+PONG`` (not ``-LOADING`` while the AOF is replayed)."""
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=1)
        except OSError:
            return False
        try:
            if self.tls:
                sock = self.ssl_context().wrap_socket(sock, server_hostname="127.0.0.1", do_handshake_on_connect=False)
                sock.do_handshake()
            sock.sendall(resp_command("AUTH", self.password) + resp_command("PING"))
            data = b""
            while data.count(b"\r\n") < 2:
                chunk = sock.recv(256)
                if not chunk:
                    return False
                data += chunk
            return data == b"+OK\r\n+PONG\r\n"
        except (OSError, ssl.SSLError):
            return False
        finally:
            sock.close()
