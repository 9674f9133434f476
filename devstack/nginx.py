"""A real nginx (Debian's ``nginx-light`` 1.22) balancing round robin over N loopback upstreams.

For tests of several proxy replicas behind one load balancer (shared state in Redis or
PostgreSQL): each ``NginxBalancer`` has its own prefix directory (config, pid, logs, temp paths)
and runs ``nginx -p <dir> -c nginx.conf -e error.log`` in the foreground, never touching
/etc/nginx or the system instance. The upstream block is plain round robin with ``keepalive``
connections (HTTP/1.1, ``Connection: ""``). Every response carries ``X-Upstream-Addr`` (nginx's
``$upstream_addr``) and the access log records it, so tests can tell which upstream served each
request (``served_by()``).

Stdlib only.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from ._proc import DevstackError, free_port, pid_alive
from ._service import Service

HEALTH_PATH = "/__devstack/health"
UPSTREAM_HEADER = "X-Upstream-Addr"


class NginxBalancer(Service):
    """``NginxBalancer(workdir, upstreams, port=None, keepalive=16, proxy_timeout=30, start_timeout=10)``.

    ``upstreams`` are ``"127.0.0.1:<port>"`` strings. nginx's defaults apply otherwise: on a
    connection error or timeout a request goes to the next upstream (``proxy_next_upstream error
    timeout``; ``$upstream_addr`` then lists every try, ``"a, b"``) and a failed upstream is
    skipped for 10 s (``max_fails=1 fail_timeout=10s``).
    """

    kind = "nginx"

    def __init__(
        self,
        workdir: Path,
        upstreams: Sequence[str],
        *,
        port: int | None = None,
        keepalive: int = 16,
        proxy_timeout: float = 30.0,
        start_timeout: float = 10.0,
    ) -> None:
        super().__init__(workdir, start_timeout=start_timeout)
        if shutil.which("nginx") is None:
            raise DevstackError("nginx is not installed: run devstack/setup.sh --nginx")
        if not upstreams:
            raise DevstackError("NginxBalancer needs at least one upstream")
        self.port = port or free_port()
        self.upstreams = list(upstreams)
        self.keepalive = keepalive
        self.proxy_timeout = proxy_timeout
        self._generation = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.directory / "nginx.conf"

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    @property
    def log_path(self) -> Path:
        return self.directory / "error.log"

    def served_by(self) -> list[str]:
        """``$upstream_addr`` of every proxied request so far, oldest first (from the access log)."""
        try:
            lines = self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [line.split(" ", 2)[2] for line in lines if line.count(" ") >= 2]

    def set_upstreams(self, upstreams: Sequence[str]) -> None:
        """Rewrite the upstream list and reload nginx (SIGHUP); returns once the new workers answer
        and the old ones have exited (until then an old worker may still take a new connection)."""
        if not upstreams:
            raise DevstackError("NginxBalancer needs at least one upstream")
        if self.pid is None:
            raise DevstackError("nginx is not running")
        self.upstreams = list(upstreams)
        self._write_conf()
        old_workers = [p for p in self.pids() if p != self.pid]
        os.kill(self.pid, signal.SIGHUP)
        deadline = time.monotonic() + self._start_timeout
        # Old workers keep accepting until they process the master's SIGQUIT: wait for them to go.
        while not self._ready() or any(pid_alive(p) for p in old_workers):
            if time.monotonic() > deadline:
                raise DevstackError(f"nginx did not load the new upstreams\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.02)

    # ------------------------------------------------------------------ Service
    def _prepare(self) -> None:
        (self.directory / "tmp").mkdir()
        self._write_conf()

    def _write_conf(self) -> None:
        self._generation += 1
        d = self.directory
        servers = "\n".join(f"        server {u} max_fails=1 fail_timeout=10s;" for u in self.upstreams)
        # Workers run as root like the master: the prefix may sit in a 0700 pytest tmp_path.
        user = "user root root;" if os.geteuid() == 0 else ""
        temp = "\n".join(
            f"    {kind}_temp_path {d}/tmp/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = f"""# written by devstack/nginx.py (generation {self._generation})
{user}
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    log_format devstack '$msec $status $upstream_addr';
    access_log {d}/access.log devstack;
{temp}
    upstream backends {{
{servers}
        keepalive {self.keepalive};
    }}
    server {{
        listen 127.0.0.1:{self.port};
        location = {HEALTH_PATH} {{
            access_log off;
            add_header X-Devstack-Generation {self._generation} always;
            return 204;
        }}
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout {self.proxy_timeout:g}s;
            proxy_send_timeout {self.proxy_timeout:g}s;
            add_header {UPSTREAM_HEADER} $upstream_addr always;
        }}
    }}
}}
"""
        self.conf_path.write_text(conf)

    def _argv(self) -> list[str]:
        d = str(self.directory)
        return ["nginx", "-p", d, "-c", str(self.conf_path), "-e", str(self.log_path)]

    def _ready(self) -> bool:
        """A worker answers the health location with the current config generation."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", HEALTH_PATH)
            response = conn.getresponse()
            response.read()
            return response.status == 204 and response.getheader("X-Devstack-Generation") == str(self._generation)
        except OSError:
            return False
        finally:
            conn.close()
