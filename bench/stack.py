"""Benchmark fixtures: nginx (a fast static upstream, a C reverse proxy, a static token issuer),
a local signing key for bench tokens, and process CPU/RSS accounting from /proc."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import RSAKey

from devstack._proc import free_port, port_open, wait_until

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
ENTITLEMENT = "urn:mace:egi.eu:group:vo.bench.org:role=member#aai.egi.eu"
AUDIENCE = "slurmproxy-bench"
PING_BODY = '{"meta":{},"errors":[],"warnings":[],"pings":[{"hostname":"fast","ping":"UP","pinged":"UP"}]}'


class BenchIssuer:
    """An RS256 signing key whose discovery document and JWKS nginx serves as static files."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.issuer = f"http://127.0.0.1:{port}"
        self.key = RSAKey.generate_key(2048, parameters={"kid": "bench-1", "use": "sig", "alg": "RS256"}, private=True)
        well_known = directory / ".well-known"
        well_known.mkdir(parents=True, exist_ok=True)
        (well_known / "openid-configuration").write_text(
            json.dumps({"issuer": self.issuer, "jwks_uri": f"{self.issuer}/jwks.json"})
        )
        (directory / "jwks.json").write_text(json.dumps({"keys": [self.key.as_dict(private=False)]}))

    def token(self, subject: str = "bench-user", lifetime: int = 7200) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + lifetime,
            "eduperson_entitlement": [ENTITLEMENT],
        }
        return jwt.encode({"alg": "RS256", "kid": "bench-1"}, claims, self.key, algorithms=["RS256"])


@dataclass
class Nginx:
    """One nginx master with three servers: the fast upstream, a proxy_pass to it, the issuer files."""

    workdir: Path
    upstream_port: int
    proxy_port: int
    issuer_port: int
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls, workdir: Path) -> Nginx:
        return cls(workdir, free_port(), free_port(), free_port())

    def conf(self, issuer_root: Path) -> str:
        return f"""
worker_processes 1;
daemon off;
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {self.workdir}/tmp;
    proxy_temp_path {self.workdir}/tmp;
    keepalive_requests 1000000;
    upstream fast {{ server 127.0.0.1:{self.upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{self.upstream_port};
        location / {{ default_type application/json; return 200 '{PING_BODY}'; }}
    }}
    server {{
        listen 127.0.0.1:{self.proxy_port};
        location / {{
            proxy_pass http://fast;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
        }}
    }}
    server {{
        listen 127.0.0.1:{self.issuer_port};
        root {issuer_root};
        location / {{ default_type application/json; }}
    }}
}}
"""

    def start(self, issuer_root: Path) -> Nginx:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.conf(issuer_root))
        log = (self.workdir / "nginx.out").open("ab")
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(self.workdir)], stdout=log, stderr=log, start_new_session=True
        )
        wait_until(lambda: all(port_open(p) for p in self.ports), 10, "nginx", logs=[self.workdir / "error.log"])
        return self

    @property
    def ports(self) -> tuple[int, int, int]:
        return (self.upstream_port, self.proxy_port, self.issuer_port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (uvicorn's master and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


def bench_policy(issuer: str) -> dict[str, Any]:
    return {
        "rules": [
            {
                "id": "bench",
                "issuers": [issuer],
                "entitlements": [ENTITLEMENT],
                "allow": ["ping", "read-only", "submit", "cancel-own"],
                "mapping": [{"service_account": "svc-alpha"}],
            }
        ]
    }
