"""Several replicas, one policy: three proxy processes (two workers each) behind nginx round robin, sharing
one Redis and one PostgreSQL, against real Slurm 22.05 and the real OpenID provider.

* a rule limited to 10 requests/s per identity holds for the deployment: 50 requests/s from one
  identity for 20 s get 10/s ± 10 % through, the rest 429 with Retry-After;
* 100 newcomers at once, spread over the replicas: 100 distinct pool accounts, each kept on every replica;
* the shared shield cache: six workers polling one cached path make one slurmctld fetch per TTL;
* Redis and PostgreSQL stopped mid-run and started again: the defined 503s for what needs them, no
  500, everything else served, one audit record per answer, the refusals counted in the metrics,
  and recovery without restarting anything.

One Slurm generation is enough here: what is shared does not depend on slurmrestd's version.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack import SlurmCluster
from devstack.nginx import NginxBalancer
from devstack.postgres import PostgresServer
from devstack.provider import MEMBER_ENTITLEMENT, PROXY_AUDIENCE, OidcProvider, default_config, machine_client
from devstack.proxy import ProxyServer
from devstack.redis_server import RedisServer
from tests.integration.conftest import ProxyFactory, proxy_config

pytestmark = pytest.mark.parametrize("slurm", ["22.05"], indirect=True, ids=["slurm-22.05"])
REPLICAS = 3
NEWCOMERS = 100
LIMIT_PER_SECOND = 10
OFFERED_PER_SECOND = 50
RATE_SECONDS = 20
SHIELD_TTL = 60.0
API = "/slurm/v0.0.38"
SUBJECTS = ["limited", "metered", "poller", "steady", "pooled"]


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    config = default_config()
    config["clients"] += [machine_client(f"{s}-cli", s, []) for s in SUBJECTS[:-1]]
    config["clients"] += [machine_client("pooled-cli", "pooled", [MEMBER_ENTITLEMENT])]
    newcomers = [machine_client(f"crowd-{n:03d}-cli", f"crowd-{n:03d}", [MEMBER_ENTITLEMENT]) for n in range(NEWCOMERS)]
    config["clients"] += newcomers
    with OidcProvider(tmp_path_factory.mktemp("oidc-replicas"), config) as provider:
        yield provider


@pytest.fixture(scope="module")
def tokens(idp: OidcProvider) -> dict[str, str]:
    subjects = SUBJECTS + [f"crowd-{n:03d}" for n in range(NEWCOMERS)]
    return {s: idp.client_credentials_token(f"{s}-cli") for s in subjects}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with PostgresServer(tmp_path_factory.mktemp("pg")) as server:
        yield server


def policy(issuer: str) -> dict[str, Any]:
    def by_subject(rule_id: str, subject: str, account: str, **extra: Any) -> dict[str, Any]:
        return {
            "id": rule_id,
            "issuers": [issuer],
            "subjects": [subject],
            "allow": ["ping", "read-only"],
            "mapping": [{"service_account": account}],
            **extra,
        }

    return {
        "rules": [
            by_subject(
                "ten-per-second", "limited", "svc-alpha", rate_limit={"per_identity": {"requests": LIMIT_PER_SECOND}}
            ),
            by_subject("metered", "metered", "svc-alpha", rate_limit={"per_identity": {"requests": 1000}}),
            by_subject("poller", "poller", "svc-beta"),
            by_subject("steady", "steady", "svc-alpha"),
            {
                "id": "newcomers",
                "issuers": [issuer],
                "entitlements": [MEMBER_ENTITLEMENT],
                "allow": ["ping"],
                "mapping": [{"pool": "big"}],
            },
        ]
    }


@dataclass
class Deployment:
    replicas: list[ProxyServer]
    balancer: NginxBalancer
    redis: RedisServer
    postgres: PostgresServer

    @property
    def url(self) -> str:
        return self.balancer.url

    def records(self) -> list[dict[str, Any]]:
        return [record for replica in self.replicas for record in replica.audit_records()]

    def metric(self, name: str, **labels: str) -> float:
        """The sum over the replicas (each answers for its two workers) of one counter's matching samples."""
        total = 0.0
        for replica in self.replicas:
            text = httpx.get(f"{replica.url}/metrics", timeout=30).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                        total += sample.value
        return total


@pytest.fixture(scope="module")
def deployment(
    slurm: SlurmCluster,
    idp: OidcProvider,
    redis_server: RedisServer,
    postgres: PostgresServer,
    proxy_factory: ProxyFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    state = {
        "backend": "shared",
        "redis": {"url": redis_server.url_without_password, "password_file": str(redis_server.password_file)},
        "postgres": {"dsn": postgres.dsn_without_password, "password_file": str(postgres.password_file)},
    }
    key = tmp_path_factory.mktemp("state-key") / "hash.key"
    key.write_bytes(b"the same key on every replica\n")
    config = proxy_config(
        slurm,
        [{"issuer": idp.issuer, "audiences": [PROXY_AUDIENCE]}],
        server={"workers": 2},
        # pool051… do not exist on this host: requests are pings, and Slurm answers a ping for anyone
        identity={"require_local_account": False, "pools": {"big": {"accounts": ["pool001..pool110"]}}},
        state={**state, "hash_key_file": str(key)},
        shield={"cache": [{"path": "/slurm/{version}/jobs", "ttl_seconds": SHIELD_TTL}]},
        metrics={"enabled": True, "path": "/metrics"},
        # 3 replicas x 2 workers x 16 connections would hold 96 of slurmrestd 22.05's connections, more than
        # its threads serve: 300 pings at once then starved some connection past the clients' timeout.
        upstream={"max_connections": 4},
    )
    replicas = [proxy_factory(config, {"site.yaml": policy(idp.issuer)}) for _ in range(REPLICAS)]
    upstreams = [f"127.0.0.1:{replica.port}" for replica in replicas]
    with NginxBalancer(tmp_path_factory.mktemp("nginx"), upstreams) as balancer:
        yield Deployment(replicas, balancer, redis_server, postgres)


@dataclass
class Answer:
    request_id: str
    subject: str
    sent: float
    answered: float
    status: int
    reason: str | None
    retry_after: str | None
    served_by: str | None


async def ask(client: httpx.AsyncClient, subject: str, token: str, path: str = f"{API}/ping") -> Answer:
    request_id = f"rep-{subject}-{uuid.uuid4().hex[:12]}"
    sent = time.monotonic()
    response = await client.get(path, headers={"Authorization": f"Bearer {token}", "X-Request-ID": request_id})
    try:
        reason = response.json().get("slurmproxy", {}).get("reason")
    except ValueError:
        reason = None
    return Answer(
        request_id,
        subject,
        sent,
        time.monotonic(),
        response.status_code,
        reason,
        response.headers.get("retry-after"),
        response.headers.get("x-upstream-addr"),
    )


def client_for(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=200))


async def offered(url: str, subject: str, token: str, per_second: float, seconds: float) -> list[Answer]:
    """``per_second`` requests a second for ``seconds``, each sent on time whatever the answers take."""
    async with client_for(url) as client:
        start = time.monotonic()
        tasks = []
        for n in range(int(per_second * seconds)):
            await asyncio.sleep(max(0.0, start + n / per_second - time.monotonic()))
            tasks.append(asyncio.create_task(ask(client, subject, token)))
        return list(await asyncio.gather(*tasks))


def test_a_rate_limit_holds_for_the_whole_deployment(deployment: Deployment, tokens: dict[str, str]) -> None:
    answers = asyncio.run(offered(deployment.url, "limited", tokens["limited"], OFFERED_PER_SECOND, RATE_SECONDS))
    statuses = Counter(a.status for a in answers)
    assert set(statuses) <= {200, 429}, statuses
    accepted = statuses[200]
    refused = [a for a in answers if a.status == 429]
    assert all(a.reason == "rate_limited" and a.retry_after == "1" for a in refused)
    assert len({a.served_by for a in answers}) == REPLICAS  # every replica took its share
    # Each check happened between its request's sending and its answer, so the checks fall in
    # [first sent, last answered] and cover at least [first answered, last sent]: a token bucket let
    # through at most its burst + rate × the first, and (offered 5 times the rate throughout) at least
    # rate × the second. On an idle machine both are the 20 s the test offered; load widens them.
    first_sent, last_sent = min(a.sent for a in answers), max(a.sent for a in answers)
    first_answered, last_answered = min(a.answered for a in answers), max(a.answered for a in answers)
    burst = LIMIT_PER_SECOND
    rate = (accepted - burst) / (last_sent - first_sent)
    print(
        f"\nrate limit across {REPLICAS} replicas × 2 workers: {len(answers)} offered in "
        f"{last_sent - first_sent:.2f} s, {accepted} accepted: {rate:.2f}/s after the burst of {burst} "
        f"(limit {LIMIT_PER_SECOND}/s)"
    )
    assert accepted <= burst + LIMIT_PER_SECOND * 1.1 * (last_answered - first_sent)
    assert accepted >= LIMIT_PER_SECOND * 0.9 * (last_sent - first_answered)
    recorded = {r["request_id"]: r for r in deployment.records() if r["request_id"].startswith("rep-limited-")}
    assert {a.request_id: a.status for a in answers} == {rid: r["status"] for rid, r in recorded.items()}


def leases_cli(replica: ProxyServer) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "slurmproxy", "mapping", "leases", "--config", str(replica.config_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    leases: list[dict[str, Any]] = json.loads(out.stdout)
    return leases


def test_100_newcomers_get_100_accounts_and_keep_them_on_every_replica(
    deployment: Deployment, tokens: dict[str, str]
) -> None:
    crowd = [f"crowd-{n:03d}" for n in range(NEWCOMERS)]

    async def at_once() -> list[Answer]:
        async with client_for(deployment.url) as client:
            return list(await asyncio.gather(*(ask(client, s, tokens[s]) for s in crowd)))

    answers = asyncio.run(at_once())
    assert [a.status for a in answers] == [200] * NEWCOMERS, Counter((a.status, a.reason) for a in answers)
    assert len({a.served_by for a in answers}) == REPLICAS
    leased = {lease["subject"]: lease["account"] for lease in leases_cli(deployment.replicas[0])}
    assert sorted(leased) == crowd and len(set(leased.values())) == NEWCOMERS

    async def on_every_replica() -> list[Answer]:
        clients = [client_for(replica.url) for replica in deployment.replicas]
        try:
            return list(await asyncio.gather(*(ask(c, s, tokens[s]) for c in clients for s in crowd)))
        finally:
            for c in clients:
                await c.aclose()

    again = asyncio.run(on_every_replica())
    assert [a.status for a in again] == [200] * (NEWCOMERS * REPLICAS)
    mine = {a.request_id for a in answers + again}
    records = [r for r in deployment.records() if r["request_id"] in mine]
    assert len(records) == len(mine)  # one record per answer
    for record in records:
        assert record["local_user"] == leased[record["subject"]], record
    new = [r for r in records if r["mapping_detail"]["lease"] == "new"]
    assert sorted(r["subject"] for r in new) == crowd  # leased once each, by whichever replica saw it first


def test_the_shared_shield_cache_makes_one_fetch_per_ttl_for_every_replica(
    deployment: Deployment, slurm: SlurmCluster, tokens: dict[str, str]
) -> None:
    async def poll(count: int) -> list[Answer]:
        async with client_for(deployment.url) as client:
            return [await ask(client, "poller", tokens["poller"], f"{API}/jobs") for _ in range(count)]

    slurm.reset_diag()
    started = time.monotonic()
    answers = asyncio.run(poll(30))
    elapsed = time.monotonic() - started
    assert [a.status for a in answers] == [200] * 30
    assert len({a.served_by for a in answers}) == REPLICAS  # sequential round robin: every replica, every worker
    by_id = {r["request_id"]: r for r in deployment.records()}
    sources = [by_id[a.request_id]["served_from"] for a in answers]
    fetches = sources.count("upstream")
    windows = 1 + math.floor(elapsed / SHIELD_TTL)  # what one process makes: one fetch per TTL that began
    assert 1 <= fetches <= windows and sources.count("cache") == 30 - fetches, sources
    rpcs = slurm.diag().get("user:svc-beta", 0)
    assert rpcs == fetches * rpcs_per_jobs_request(slurm), (rpcs, fetches)


def rpcs_per_jobs_request(slurm: SlurmCluster) -> int:
    """slurmctld RPCs one GET /jobs makes as svc-beta, asked of slurmrestd directly."""
    token = slurm.mint_token("svc-beta", 300)
    slurm.reset_diag()
    response = httpx.get(
        f"{slurm.url}{API}/jobs",
        headers={"X-SLURM-USER-NAME": "svc-beta", "X-SLURM-USER-TOKEN": token},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return slurm.diag().get("user:svc-beta", 0)


async def steady_load(url: str, tokens: dict[str, str], stop: asyncio.Event) -> list[Answer]:
    """Three identities, one request each every 50 ms: one under a rate limit (Redis), one pool-mapped
    (PostgreSQL), one that needs neither."""
    answers: list[Answer] = []
    async with client_for(url) as client:
        while not stop.is_set():
            round_ = [ask(client, s, tokens[s]) for s in ("metered", "pooled", "steady")]
            answers += await asyncio.gather(*round_)
            await asyncio.sleep(0.05)
    return answers


def test_redis_and_postgres_stopped_mid_run(deployment: Deployment, tokens: dict[str, str]) -> None:
    async def scenario() -> tuple[list[Answer], dict[str, tuple[float, float]]]:
        stop = asyncio.Event()
        load = asyncio.create_task(steady_load(deployment.url, tokens, stop))
        phases: dict[str, tuple[float, float]] = {}
        probes = await until_served(deployment.url, tokens, "pooled")
        for name, server in (("redis", deployment.redis), ("postgres", deployment.postgres)):
            await asyncio.sleep(1)
            down = time.monotonic()
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(2)
            await asyncio.to_thread(server.start)
            phases[name] = (down, time.monotonic())
            probes += await until_served(deployment.url, tokens, "metered" if name == "redis" else "pooled")
        await asyncio.sleep(1)
        stop.set()
        return await load + probes, phases

    answers, phases = asyncio.run(scenario())
    by_status = Counter((a.subject, a.status, a.reason) for a in answers)
    allowed = {
        ("steady", 200, None),
        ("metered", 200, None),
        ("metered", 503, "rate_limit_unavailable"),  # Redis down: the rate-limited rule fails closed
        ("pooled", 200, None),
        ("pooled", 503, "pool_unavailable"),  # PostgreSQL down: no pool account can be confirmed
    }
    assert set(by_status) <= allowed, by_status
    assert by_status[("steady", 200, None)] == sum(a.subject == "steady" for a in answers)  # never touched
    assert by_status[("metered", 503, "rate_limit_unavailable")] > 0
    assert by_status[("pooled", 503, "pool_unavailable")] > 0
    for answer in answers:  # each refusal falls in the outage of its backend (an answer may straddle its end)
        if answer.reason in ("rate_limit_unavailable", "pool_unavailable"):
            down, up = phases["redis" if answer.reason == "rate_limit_unavailable" else "postgres"]
            assert down <= answer.answered and answer.sent <= up + 30, answer
    last = {a.subject: a for a in sorted(answers, key=lambda a: a.sent)}
    assert {s: a.status for s, a in last.items()} == {"metered": 200, "pooled": 200, "steady": 200}

    records = {r["request_id"]: r for r in deployment.records()}
    assert all(a.request_id in records for a in answers)  # nothing lost in the audit
    for answer in answers:
        record = records[answer.request_id]
        assert (record["status"], record["reason"] if answer.status >= 400 else None) == (answer.status, answer.reason)
    pooled = {records[a.request_id]["local_user"] for a in answers if a.subject == "pooled" and a.status == 200}
    assert len(pooled) == 1  # the same account before and after PostgreSQL's restart
    for reason in ("rate_limit_unavailable", "pool_unavailable"):
        counted = deployment.metric("slurmproxy_requests_total", reason=reason)
        assert counted == by_status[("metered" if reason.startswith("rate") else "pooled", 503, reason)]
    assert deployment.metric("slurmproxy_requests_total", status="500") == 0


async def until_served(url: str, tokens: dict[str, str], subject: str, within: float = 60.0) -> list[Answer]:
    """Ask until two rounds over the replicas answer ``subject`` with 200 (recovery needs no restart); the answers."""
    deadline = time.monotonic() + within
    answers: list[Answer] = []
    async with client_for(url) as client:
        ok = 0
        while ok < 2 * REPLICAS:
            answer = await ask(client, subject, tokens[subject])
            answers.append(answer)
            ok = ok + 1 if answer.status == 200 else 0
            assert time.monotonic() < deadline, f"{subject}: still {answer.status} {answer.reason}"
            await asyncio.sleep(0.05)
    return answers
