"""A real OTLP receiver: the OpenTelemetry Collector, built from the Go module proxy.

``devstack/otelcol/`` is a tiny project-written Go module (``main.go``, ``go.mod``, ``go.sum``):
``go.opentelemetry.io/collector/otelcol`` with the OTLP receiver (gRPC and HTTP), contrib's file
exporter and the debug exporter, all at collector release v0.161.0 (core modules v1.67.0). Why
not v0.165.0: contrib's ``fileexporter`` passes ``go get`` + ``go mod tidy`` only up to v0.161.0
here, and collector modules must all be at one release.

``build()`` compiles it once into ``/var/cache/slurmproxy-devstack/otelcol`` (or
``$SLURMPROXY_DEVSTACK_CACHE/otelcol``), with GOMODCACHE and GOCACHE under the same directory,
under a flock so concurrent sessions build once; a stamp (sha256 of the module's three files and
the Go version) decides whether the cached binary is current. ``python3 -m devstack.otel
build|check|path`` runs without the venv (``devstack/setup.sh --otel`` calls it).

``OtelCollector`` runs the binary on loopback and writes what it receives, as OTLP JSON lines,
to ``traces.jsonl``, ``metrics.jsonl`` and ``logs.jsonl`` in its directory. The file exporter has
no queue and, configured with a ``rotation`` block, no write buffer: an export that was answered
is already in the file, and the files are appended to across restarts.

Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ._proc import DevstackError, flocked, free_port, port_open, tail
from ._service import SAFE_PATH, Service

SOURCE = Path(__file__).resolve().parent / "otelcol"
BINARY_NAME = "otelcol-devstack"
BUILD_TIMEOUT = 1200.0
"""A cold build (modules downloaded, everything compiled) took 2.6 min on 2 cores here (4.4 min with cgo)."""


def cache_dir() -> Path:
    base = Path(os.environ.get("SLURMPROXY_DEVSTACK_CACHE", "/var/cache/slurmproxy-devstack"))
    return base / "otelcol"


def binary_path() -> Path:
    return cache_dir() / BINARY_NAME


def _go() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        raise DevstackError("the OTLP collector is built with Go, and no `go` was found (PATH, /usr/local/go/bin)")
    return go


def _go_env() -> dict[str, str]:
    root = cache_dir()
    env = {
        "PATH": f"{Path(_go()).parent}:{SAFE_PATH}",
        "HOME": str(root),
        "GOMODCACHE": str(root / "gomodcache"),
        "GOCACHE": str(root / "gocache"),
        "GOPATH": str(root / "gopath"),
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "-mod=readonly -modcacherw -buildvcs=false",
        "CGO_ENABLED": "0",
        "GOPROXY": os.environ.get("GOPROXY", "https://proxy.golang.org,direct"),
    }
    for name in ("GONOSUMDB", "GOPRIVATE", "GOSUMDB", "GOINSECURE"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _stamp() -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update(name.encode() + b"\0" + (SOURCE / name).read_bytes())
    version = subprocess.run([_go(), "env", "GOVERSION"], capture_output=True, text=True, timeout=60).stdout
    digest.update(version.strip().encode())
    return digest.hexdigest()


def ready() -> bool:
    stamp = cache_dir() / "stamp"
    try:
        return binary_path().exists() and stamp.read_text().strip() == _stamp()
    except OSError:
        return False


def build() -> Path:
    """The collector binary, built once per source/Go version (under a flock; stamp written last)."""
    if ready():
        return binary_path()
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with flocked(root.parent / ".otelcol.lock", timeout=BUILD_TIMEOUT + 60):
        if ready():
            return binary_path()
        log = root / "build.log"
        partial = root / f".{BINARY_NAME}.partial"
        argv = [_go(), "build", "-trimpath", "-ldflags=-s -w", "-o", str(partial), "."]
        started = time.monotonic()
        with log.open("ab") as out:
            out.write(f"=== {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
            out.flush()
            try:
                code = subprocess.run(
                    argv,
                    cwd=SOURCE,
                    env=_go_env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=BUILD_TIMEOUT,
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired as exc:
                raise DevstackError(f"building the OTLP collector timed out after {BUILD_TIMEOUT:.0f} s") from exc
            out.write(f"=== exit {code} after {time.monotonic() - started:.1f} s\n".encode())
        if code != 0:
            raise DevstackError(f"building the OTLP collector failed ({code})\n{tail(log)}")
        partial.replace(binary_path())
        (root / "stamp").write_text(_stamp() + "\n")
    return binary_path()


Span = dict[str, Any]


def flatten_attributes(attributes: list[dict[str, Any]]) -> dict[str, Any]:
    """OTLP JSON ``[{"key": k, "value": {"stringValue": v}}]`` → ``{k: v}``.

    Integers stay strings (``{"intValue": "3"}``): OTLP JSON encodes 64-bit integers as strings."""
    out: dict[str, Any] = {}
    for item in attributes:
        value = item.get("value", {})
        out[item["key"]] = next(iter(value.values())) if value else None
    return out


class OtelCollector(Service):
    """``OtelCollector(workdir, grpc_port=None, http_port=None, start_timeout=30)``.

    ``http_endpoint`` (``http://127.0.0.1:<port>``, OTLP/HTTP: ``/v1/traces``, ``/v1/metrics``,
    ``/v1/logs``, protobuf or JSON) and ``grpc_endpoint`` (``127.0.0.1:<port>``, plaintext).
    ``spans()`` reads what arrived so far; ``wait_spans(n)`` waits for at least ``n``.
    Received data survives ``restart()`` (the files are appended to).
    """

    kind = "otelcol"

    def __init__(
        self,
        workdir: Path,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        super().__init__(workdir, start_timeout=start_timeout)
        self.binary = build()
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def traces_url(self) -> str:
        return f"{self.http_endpoint}/v1/traces"

    @property
    def conf_path(self) -> Path:
        return self.directory / "config.json"

    def output(self, signal: str = "traces") -> Path:
        return self.directory / f"{signal}.jsonl"

    def exports(self, signal: str = "traces") -> list[dict[str, Any]]:
        """Every export request received for ``signal`` (``traces``, ``metrics``, ``logs``), as OTLP JSON."""
        try:
            text = self.output(signal).read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def spans(self) -> list[Span]:
        """Received spans, flattened: OTLP JSON span fields (``traceId``, ``spanId``, ``parentSpanId``,
        ``name``, ``kind``, ``status``, ...) with ``attributes`` as a dict, plus ``resource`` (a dict)
        and ``scope`` (the instrumentation scope's name)."""
        spans: list[Span] = []
        for export in self.exports("traces"):
            for resource_spans in export.get("resourceSpans", []):
                resource = flatten_attributes(resource_spans.get("resource", {}).get("attributes", []))
                for scope_spans in resource_spans.get("scopeSpans", []):
                    scope = scope_spans.get("scope", {}).get("name", "")
                    for span in scope_spans.get("spans", []):
                        flat = dict(span)
                        flat["attributes"] = flatten_attributes(span.get("attributes", []))
                        flat["resource"] = resource
                        flat["scope"] = scope
                        spans.append(flat)
        return spans

    def wait_spans(self, count: int, timeout: float = 10.0) -> list[Span]:
        """At least ``count`` spans, or DevstackError after ``timeout`` (exporters batch and retry)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if len(spans) >= count:
                return spans
            if time.monotonic() > deadline:
                raise DevstackError(
                    f"{len(spans)} spans after {timeout:.0f} s, expected {count}\n{tail(self.log_path)}"
                )
            time.sleep(0.05)

    # ------------------------------------------------------------------ Service
    def _prepare(self) -> None:
        config = {
            "receivers": {
                "otlp": {
                    "protocols": {
                        "grpc": {"endpoint": self.grpc_endpoint},
                        "http": {"endpoint": f"127.0.0.1:{self.http_port}"},
                    }
                }
            },
            # With a ``rotation`` block the file exporter writes each export straight to the file
            # (without one: a buffer flushed every second, and the file truncated at start).
            "exporters": {
                f"file/{s}": {
                    "path": str(self.output(s)),
                    "format": "json",
                    "rotation": {"max_megabytes": 1024, "max_backups": 1},
                }
                for s in _SIGNALS
            },
            "service": {
                "telemetry": {"logs": {"level": "info", "encoding": "console"}, "metrics": {"level": "none"}},
                "pipelines": {s: {"receivers": ["otlp"], "exporters": [f"file/{s}"]} for s in _SIGNALS},
            },
        }
        self.conf_path.write_text(json.dumps(config, indent=2) + "\n")

    def _argv(self) -> list[str]:
        return [str(self.binary), f"--config=file:{self.conf_path}"]

    def _ready(self) -> bool:
        return port_open(self.grpc_port) and port_open(self.http_port)


_SIGNALS = ("traces", "metrics", "logs")


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "build"
    if command == "build":
        started = time.monotonic()
        was_ready = ready()
        path = build()
        print(f"{path} ({'cached' if was_ready else f'built in {time.monotonic() - started:.0f} s'})")
        return 0
    if command == "check":
        ok = ready()
        print("ok" if ok else "missing or stale")
        return 0 if ok else 1
    if command == "path":
        print(binary_path())
        return 0
    print(f"usage: python3 -m devstack.otel build|check|path (not {command!r})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
