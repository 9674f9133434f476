"""The proxy with ``state.backend: shared``, in process: what a client, the audit trail and the metrics see
when Redis or PostgreSQL fail, and that they recover without a restart."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from pytest_httpx import HTTPXMock

from devstack.postgres import PostgresServer
from devstack.redis_server import RedisServer
from slurmproxy.config.settings import Settings
from tests.asgi import app_session
from tests.fakeupstream import ThreadedFakeSlurmrestd as Upstream
from tests.helpers import ISSUER, JWKS_URI, UPSTREAM, Signer, basic_policy, discovery, make_settings

pytestmark = [pytest.mark.integration, pytest.mark.anyio]
PING = "/slurm/v0.0.38/ping"


def shared_settings(tmp_path: Path, redis_server: RedisServer, postgres: PostgresServer, **policy: Any) -> Settings:
    return make_settings(
        tmp_path,
        basic_policy(**policy),
        identity={"pools": {"vo": {"accounts": ["pool001..pool003"]}}},
        state={
            "backend": "shared",
            "retry_seconds": 0.2,
            "redis": {
                "url": redis_server.url_without_password,
                "password_file": str(redis_server.password_file),
                "timeout_seconds": 0.5,
            },
            "postgres": {
                "dsn": postgres.dsn_without_password,
                "password_file": str(postgres.password_file),
                "timeout_seconds": 1.0,
            },
        },
    )


def records(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]


@pytest.fixture
def signer(httpx_mock: HTTPXMock, upstream: Upstream) -> Signer:
    signer = Signer()
    httpx_mock.add_response(url=f"{ISSUER}/.well-known/openid-configuration", json=discovery(), is_reusable=True)
    httpx_mock.add_response(url=JWKS_URI, json=signer.jwks(), is_reusable=True)
    upstream.add_response(url=f"{UPSTREAM}{PING}", json={"pings": []}, is_reusable=True)
    return signer


async def until_status(client: Any, headers: dict[str, str], status: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while (await client.get(PING, headers=headers)).status_code != status:
        assert time.monotonic() < deadline, f"no {status} within {within} s"
        await asyncio.sleep(0.1)


async def test_redis_down_refuses_rate_limited_rules_with_a_clear_audited_counted_503(
    tmp_path: Path, signer: Signer, clean_redis: RedisServer, clean_postgres: PostgresServer
) -> None:
    limits = {"per_identity": {"requests": 100, "period_seconds": 3600}}
    settings = shared_settings(tmp_path, clean_redis, clean_postgres, rate_limit=limits)
    headers = {"Authorization": f"Bearer {signer.token()}"}
    async with app_session(settings) as (client, state):
        assert (await client.get(PING, headers=headers)).status_code == 200
        clean_redis.stop()
        try:
            started = time.monotonic()
            refused = await client.get(PING, headers=headers)
            assert time.monotonic() - started < 3
        finally:
            clean_redis.start()
        await until_status(client, headers, 200)
        metrics = (await client.get("/metrics")).text
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    body = refused.json()
    assert body["slurmproxy"]["reason"] == "rate_limit_unavailable"
    assert "the shared rate-limit store (Redis is unreachable)" in body["errors"][0]["error"]
    audit = [r for r in records(tmp_path) if r["status"] == 503]
    assert audit and audit[0]["reason"] == "rate_limit_unavailable" and audit[0]["decision"] == "error"
    assert audit[0]["rule"] == "members" and audit[0]["upstream_status"] is None
    assert 'slurmproxy_requests_total{decision="error",reason="rate_limit_unavailable"' in metrics
    assert 'slurmproxy_state_errors_total{backend="Redis",kind="unreachable",use="rate_limit"}' in metrics
    assert state["runtime"].settings.state.backend == "shared"


async def test_postgres_down_refuses_pool_mapped_requests_and_keeps_their_leases(
    tmp_path: Path, signer: Signer, clean_redis: RedisServer, clean_postgres: PostgresServer
) -> None:
    settings = shared_settings(tmp_path, clean_redis, clean_postgres, mapping=[{"pool": "vo"}])
    headers = {"Authorization": f"Bearer {signer.token()}"}
    async with app_session(settings) as (client, _):
        assert (await client.get(PING, headers=headers)).status_code == 200
        clean_postgres.stop()
        try:
            refused = await client.get(PING, headers=headers)
        finally:
            clean_postgres.start()
        await until_status(client, headers, 200)
    assert refused.status_code == 503 and refused.json()["slurmproxy"]["reason"] == "pool_unavailable"
    accounts = [r["local_user"] for r in records(tmp_path) if r["status"] == 200]
    assert set(accounts) == {"pool001"}  # the same lease before and after: nothing was lost
    first, *_, last = [r for r in records(tmp_path) if r["status"] == 200]
    assert first["mapping_detail"]["lease"] == "new" and last["mapping_detail"]["lease"] == "existing"
