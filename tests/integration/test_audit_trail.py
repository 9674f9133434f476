"""Issue 6, through the real server: 1,000 concurrent requests give exactly 1,000 audit records.

The proxy runs as a real ``slurmproxy serve`` with two uvicorn workers, a small rotation size (so
both workers rotate the one audit file under load), JSON logs, and metrics in prometheus
multiprocess mode; allowed requests reach the real slurmrestd.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack import SlurmCluster
from devstack.provider import PROXY_AUDIENCE, OidcProvider
from devstack.proxy import ProxyServer
from slurmproxy.audit.file import rotated_files
from tests.integration.conftest import ProxyFactory, proxy_config, site_policy

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs" / "audit.schema.json").read_text())
# kind: (requests, expected status, expected reason)
PLAN = {
    "allowed": (400, 200, "allowed"),
    "no-entitlement": (300, 403, "no_rule_matches"),
    "bad-signature": (200, 401, "bad_signature"),
    "no-token": (100, 401, "missing_token"),
}


def forged_signature(token: str) -> str:
    head, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[0] ^= 0xFF
    return f"{head}.{payload}.{base64.urlsafe_b64encode(bytes(raw)).rstrip(b'=').decode()}"


async def fire(url: str, requests: list[tuple[str, str, dict[str, str]]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=180) as client:
        return await asyncio.gather(*(client.get(path, headers=headers) for _, path, headers in requests))


def all_records(proxy: ProxyServer) -> tuple[list[Path], list[str]]:
    files = [*rotated_files(proxy.audit_path), proxy.audit_path]
    return files, [line for f in files for line in f.read_text().splitlines()]


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@pytest.fixture
def busy_proxy(
    slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory, tmp_path: Path
) -> Iterator[ProxyServer]:
    config = proxy_config(
        slurm,
        [{"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}],
        server={"workers": 2},
        # slurmrestd serves a limited number of connections at once: with two workers x the default pool of 100,
        # one run in two here got 504s (requests waited past the upstream timeout). docs/operations.md, "Sizing".
        upstream={"max_connections": 16},
        audit={"sink": "file", "file": str(tmp_path / "audit" / "audit.log"), "max_bytes": 64 * 1024},
        log={"json": True},
    )
    server = proxy_factory(config, {"site.yaml": site_policy(oidc.issuer)})
    yield server
    # Stopped now, not at the end of the session: its idle pooled connections count against slurmrestd's
    # connection limit, and later tests on the same cluster need them.
    server.stop()


def test_a_thousand_concurrent_requests_leave_exactly_a_thousand_valid_records(
    busy_proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str
) -> None:
    member = oidc.client_credentials_token("alice-cli")
    outsider = oidc.client_credentials_token("dave-cli")
    tokens = {"allowed": member, "no-entitlement": outsider, "bad-signature": forged_signature(member)}
    requests: list[tuple[str, str, dict[str, str]]] = []
    for kind, (count, _, _) in PLAN.items():
        for n in range(count):
            headers = {"X-Request-ID": f"load-{kind}-{n}"}
            if kind in tokens:
                headers["Authorization"] = f"Bearer {tokens[kind]}"
            requests.append((kind, f"{api}/ping", headers))
    assert len(requests) == 1000

    responses = asyncio.run(fire(busy_proxy.url, requests))

    for (kind, _, headers), response in zip(requests, responses, strict=True):
        assert response.status_code == PLAN[kind][1], (kind, response.text)
        assert response.headers["x-request-id"] == headers["X-Request-ID"]
    files, lines = all_records(busy_proxy)
    assert len(files) > 2, "both workers rotated the audit file under load"
    assert len(lines) == 1000
    records = [json.loads(line) for line in lines]
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for record in records:
        validator.validate(record)
    by_id = {r["request_id"]: r for r in records}
    assert sorted(by_id) == sorted(h["X-Request-ID"] for _, _, h in requests)  # each request exactly once
    for kind, (count, status, reason) in PLAN.items():
        mine = [by_id[f"load-{kind}-{n}"] for n in range(count)]
        assert {(r["status"], r["reason"]) for r in mine} == {(status, reason)}
    allowed = [by_id[f"load-allowed-{n}"] for n in range(400)]
    assert {(r["upstream_status"], r["local_user"], r["rule"], r["vo"]) for r in allowed} == {
        (200, "alice", "example-members", "vo.example.org")
    }
    assert all(r["upstream_ms"] is not None and r["client"] == "127.0.0.1" for r in allowed)

    # No token or secret in any record or log line.
    logs = busy_proxy.log_path.read_text()
    written = "\n".join(lines) + logs
    key = slurm.jwt_key_path.read_bytes()
    for secret in [member, outsider, forged_signature(member), *(t.split(".")[2] for t in (member, outsider))]:
        assert secret not in written
    assert key.hex() not in written and base64.b64encode(key).decode() not in written
    proxy_lines = [line for line in logs.splitlines() if not line.startswith("=== ")]  # the harness's markers
    assert proxy_lines and all(json.loads(line)["message"] for line in proxy_lines)  # every log line is JSON

    # The metrics of both workers, added up (prometheus multiprocess mode).
    text = httpx.get(f"{busy_proxy.url}/metrics", timeout=30).text
    assert metric(text, "slurmproxy_requests_total", decision="allow") == 400
    assert metric(text, "slurmproxy_requests_total", decision="deny", reason="no_rule_matches") == 300
    assert metric(text, "slurmproxy_requests_total", decision="deny", status="401") == 300
    assert metric(text, "slurmproxy_upstream_duration_seconds_count") == 400
    assert metric(text, "slurmproxy_audit_records_total") == 1000
    assert metric(text, "slurmproxy_cache_requests_total", cache="token") == 900

    # The auditor's tool reads the rotated files too.
    summary = subprocess.run(
        [sys.executable, "-m", "slurmproxy", "audit", str(busy_proxy.audit_path), "--summary", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    totals: dict[str, Any] = json.loads(summary.stdout)
    assert totals["total"] == 1000
    assert totals["by_decision"] == {"deny": 600, "allow": 400}
    assert Counter(totals["by_status"]) == Counter({"200": 400, "401": 300, "403": 300})
    assert totals["by_vo"] == {"-": 600, "vo.example.org": 400}
