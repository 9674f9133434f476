"""The proxy itself as a real server: ``slurmproxy serve`` in a subprocess, on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from ._proc import free_port, spawn, tail, wait_until


class ProxyServer:
    """Writes ``config.yaml`` (and policies, if given) into ``workdir`` and runs the proxy on it.

    The audit log goes to ``workdir/audit.log`` unless the config says otherwise; application logs
    to ``workdir/proxy.log``. With ``server.tls`` in the config the URL is ``https://``, and
    ``client_ssl`` (trusting the test CA, with a client certificate where one is required) is what
    the liveness check connects with.
    """

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        policies: dict[str, Any] | None = None,
        *,
        env: dict[str, str] | None = None,
        client_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.workdir = workdir
        self.client_ssl = client_ssl
        self.port = free_port()
        self.config = config
        self.policies = policies
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.config.get("server", {}).get("tls") else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yaml"

    @property
    def audit_path(self) -> Path:
        return Path(self.config.get("audit", {}).get("file", self.workdir / "audit.log"))

    @property
    def log_path(self) -> Path:
        return self.workdir / "proxy.log"

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = json.loads(json.dumps(self.config))
        config.setdefault("server", {}).update(host="127.0.0.1", port=self.port)
        config.setdefault("audit", {"sink": "file", "file": str(self.workdir / "audit.log")})
        if self.policies is not None:
            policy_dir = self.workdir / "policies"
            policy_dir.mkdir(exist_ok=True)
            for name, content in self.policies.items():
                (policy_dir / name).write_text(content if isinstance(content, str) else yaml.safe_dump(content))
            config.setdefault("policy", {"paths": [str(policy_dir)]})
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self, timeout: float = 20) -> ProxyServer:
        self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURMPROXY_")}
        env.update(self.extra_env)
        self.proc = spawn(
            [sys.executable, "-m", "slurmproxy", "serve", "--config", str(self.config_path)],
            self.log_path,
            env,
            cwd=self.workdir,
        )

        def dead() -> str | None:
            assert self.proc is not None
            code = self.proc.poll()
            return None if code is None else f"slurmproxy exited with status {code}"

        wait_until(self.live, timeout, "slurmproxy to answer", logs=[self.log_path], alive=dead)
        return self

    def live(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/_slurmproxy/live", timeout=1, context=self.client_ssl) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def restart(self) -> ProxyServer:
        self.stop()
        return self.start()

    def audit_lines(self) -> list[dict[str, Any]]:
        """Every record as written: a state-changing request's intent and outcome both."""
        try:
            text = self.audit_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def audit_records(self) -> list[dict[str, Any]]:
        """One record per answered request (the intents taken out), after checking that every outcome
        record follows the intent record of its request: nothing slurmrestd did is without one."""
        lines = self.audit_lines()
        waiting: dict[str, int] = {}
        for line in lines:
            rid, kind = line["request_id"], line.get("kind", "request")
            if kind == "intent":
                waiting[rid] = waiting.get(rid, 0) + 1
            elif kind == "outcome":
                assert waiting.get(rid, 0) > 0, f"an outcome without its intent record: {line}"
                waiting[rid] -= 1
        return [line for line in lines if line.get("kind", "request") != "intent"]

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
