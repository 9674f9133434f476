from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pytest_httpx import HTTPXMock

from slurmproxy.errors import DependencyError
from slurmproxy.identity.alise import AliseClient
from slurmproxy.observability.metrics import MULTIPROC_ENV, Metrics, prepare_multiprocess, remove_multiprocess_dir
from tests.asgi import app_client, app_session
from tests.fakeupstream import ThreadedFakeSlurmrestd as Upstream
from tests.helpers import UPSTREAM, Signer, basic_policy, make_settings, serve_keys, write_policy

PING = "/slurm/v0.0.40/ping"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: httpx.AsyncClient, path: str = "/metrics") -> Samples:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture
def signer(httpx_mock: HTTPXMock) -> Signer:
    return serve_keys(httpx_mock, Signer())


@pytest.mark.anyio
async def test_allowed_denied_and_failed_requests_move_their_counters(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{PING}", json={"pings": []})
    upstream.add_exception("close", url=f"{UPSTREAM}{PING}", is_reusable=True)  # also the retry on a new connection
    member = {"Authorization": f"Bearer {signer.token()}"}
    outsider = {"Authorization": f"Bearer {signer.token(eduperson_entitlement=[])}"}
    async with app_client(make_settings(tmp_path)) as client:
        before = await scrape(client)
        assert (await client.get(PING, headers=member)).status_code == 200
        after_allowed = await scrape(client)
        assert (await client.get(PING, headers=outsider)).status_code == 403
        assert (await client.get(PING)).status_code == 401
        after_denied = await scrape(client)
        assert (await client.get(PING, headers=member)).status_code == 502
        after_failed = await scrape(client)

    requests = "slurmproxy_requests_total"
    allowed = {"decision": "allow", "status": "200", "rule": "members", "reason": "allowed"}
    assert delta(before, after_allowed, requests, **allowed) == 1
    assert delta(before, after_allowed, "slurmproxy_upstream_duration_seconds_count") == 1
    assert delta(before, after_allowed, "slurmproxy_request_duration_seconds_count", decision="allow") == 1
    assert delta(before, after_allowed, "slurmproxy_cache_requests_total", cache="token", result="miss") == 1
    assert delta(before, after_allowed, "slurmproxy_audit_records_total") == 1

    no_rule = {"decision": "deny", "status": "403", "rule": "", "reason": "no_rule_matches"}
    assert delta(after_allowed, after_denied, requests, **no_rule) == 1
    no_token = {"decision": "deny", "status": "401", "rule": "", "reason": "missing_token"}
    assert delta(after_allowed, after_denied, requests, **no_token) == 1
    assert delta(after_allowed, after_denied, requests, **allowed) == 0
    assert delta(after_allowed, after_denied, "slurmproxy_upstream_duration_seconds_count") == 0

    failed = {"decision": "error", "status": "502", "rule": "members", "reason": "upstream_unreachable"}
    assert delta(after_denied, after_failed, requests, **failed) == 1
    upstream_error = {"dependency": "upstream", "reason": "upstream_unreachable"}
    assert delta(after_denied, after_failed, "slurmproxy_dependency_errors_total", **upstream_error) == 1
    assert delta(after_denied, after_failed, "slurmproxy_upstream_duration_seconds_count") == 1
    assert delta(after_denied, after_failed, "slurmproxy_cache_requests_total", cache="token", result="hit") == 1
    assert value(after_failed, "slurmproxy_audit_records_total") == 4


@pytest.mark.anyio
async def test_provider_failures_are_counted_per_exchange_and_per_request(
    tmp_path: Path, httpx_mock: HTTPXMock
) -> None:
    signer = serve_keys(httpx_mock, Signer(), jwks_status=500)
    async with app_client(make_settings(tmp_path)) as client:
        before = await scrape(client)
        response = await client.get(PING, headers={"Authorization": f"Bearer {signer.token()}"})
        after = await scrape(client)
    assert response.status_code == 503
    calls = "slurmproxy_dependency_requests_total"
    assert value(after, calls, dependency="provider", outcome="5xx") >= 1  # at start-up, or for this request
    assert value(after, calls, dependency="provider", outcome="2xx") >= 1  # discovery
    errors = {"dependency": "provider", "reason": "provider_error"}
    assert delta(before, after, "slurmproxy_dependency_errors_total", **errors) == 1
    assert value(after, "slurmproxy_dependency_duration_seconds_count", dependency="provider") >= 2


@pytest.mark.anyio
async def test_audit_failure_is_counted_and_the_request_refused(tmp_path: Path, signer: Signer) -> None:
    settings = make_settings(tmp_path, audit={"sink": "file", "file": "/dev/full", "max_bytes": 0})
    async with app_client(settings) as client:
        response = await client.get(PING)
        samples = await scrape(client)
    assert response.status_code == 503 and response.json()["slurmproxy"]["reason"] == "audit_unavailable"
    assert value(samples, "slurmproxy_audit_write_failures_total") == 1
    refused = {"decision": "error", "status": "503", "rule": "", "reason": "audit_unavailable"}
    assert value(samples, "slurmproxy_requests_total", **refused) == 1


@pytest.mark.anyio
async def test_policy_status_and_build_info(tmp_path: Path, signer: Signer) -> None:
    async with app_client(make_settings(tmp_path)) as client:
        samples = await scrape(client)
    assert value(samples, "slurmproxy_policy_loads_total", result="success") == 1
    assert value(samples, "slurmproxy_policy_last_load_success") == 1
    assert value(samples, "slurmproxy_policy_rules") == 1
    assert value(samples, "slurmproxy_policy_last_success_timestamp_seconds") > 1.7e9
    assert value(samples, "slurmproxy_build_info", version="0.1.0") == 1
    assert value(samples, "process_cpu_seconds_total") > 0


@pytest.mark.anyio
async def test_metrics_path_is_configurable_and_can_be_switched_off(tmp_path: Path, signer: Signer) -> None:
    async with app_client(make_settings(tmp_path, metrics={"path": "/internal/metrics"})) as client:
        assert value(await scrape(client, "/internal/metrics"), "slurmproxy_policy_rules") == 1
        assert (await client.get("/metrics")).status_code == 401  # a proxied path like any other
    async with app_client(make_settings(tmp_path, metrics={"enabled": False})) as client:
        assert (await client.get("/metrics")).status_code == 401


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/", id="root"),
        pytest.param("/slurm/metrics", id="slurmrestd"),
        pytest.param("/openapi.json", id="openapi"),
        pytest.param("/_slurmproxy/metrics", id="own-prefix"),
        pytest.param("metrics", id="relative"),
    ],
)
def test_metrics_path_must_not_shadow_other_paths(tmp_path: Path, path: str) -> None:
    from slurmproxy.errors import ConfigError

    with pytest.raises(ConfigError, match="metrics.path"):
        make_settings(tmp_path, metrics={"path": path})


def test_multiprocess_directory_is_prepared_only_for_several_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    settings = make_settings(tmp_path)
    try:
        assert prepare_multiprocess(settings, 1) is None and MULTIPROC_ENV not in os.environ
        created = prepare_multiprocess(settings, 2)
        assert created is not None and created.is_dir() and os.environ[MULTIPROC_ENV] == str(created)
        assert prepare_multiprocess(settings, 2) is None, "an operator's (or a parent's) directory is kept"
        remove_multiprocess_dir(created)
        assert not created.exists() and MULTIPROC_ENV not in os.environ

        configured = tmp_path / "prom"
        configured.mkdir()
        (configured / "counter_123.db").write_bytes(b"stale")
        settings = make_settings(tmp_path, metrics={"multiprocess_dir": str(configured)})
        assert prepare_multiprocess(settings, 3) is None
        assert os.environ[MULTIPROC_ENV] == str(configured) and list(configured.iterdir()) == []
    finally:
        os.environ.pop(MULTIPROC_ENV, None)  # the process's own metrics must stay in memory for later tests


@pytest.mark.anyio
async def test_alise_lookups_count_cache_results_and_exchanges(tmp_path: Path, httpx_mock: HTTPXMock) -> None:
    from tests.identity.test_alise import ISS, SUB, Clock, sample, settings, url

    httpx_mock.add_response(url=url(), json=sample("mapping_response.constructed"))
    httpx_mock.add_response(url=url("other@egi.eu"), status_code=500)
    metrics = Metrics()
    alise = AliseClient.create("egi", settings(tmp_path), clock=Clock(), metrics=metrics)
    try:
        assert (await alise.lookup(ISS, SUB)).via == "alise"
        assert (await alise.lookup(ISS, SUB)).via == "cache"
        with pytest.raises(DependencyError):
            await alise.lookup(ISS, "other@egi.eu")
    finally:
        await alise.aclose()
    sample_value = metrics.registry.get_sample_value
    assert sample_value("slurmproxy_cache_requests_total", {"cache": "alise", "result": "miss"}) == 2
    assert sample_value("slurmproxy_cache_requests_total", {"cache": "alise", "result": "hit"}) == 1
    assert sample_value("slurmproxy_dependency_requests_total", {"dependency": "alise", "outcome": "2xx"}) == 1
    assert sample_value("slurmproxy_dependency_requests_total", {"dependency": "alise", "outcome": "5xx"}) == 1
    assert "apikey" not in metrics.render().decode()


@pytest.mark.anyio
async def test_policy_reloads_move_the_policy_metrics(
    tmp_path: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURMPROXY_POLICY__RELOAD_INTERVAL_SECONDS", "0")  # no watcher: reloads only when asked
    async with app_session(make_settings(tmp_path)) as (client, state):
        reloader = state["runtime"].policy_reloader
        (tmp_path / "policies" / "policy.yaml").write_text("rules: [")
        assert await reloader.reload("test") is False
        broken = await scrape(client)
        write_policy(tmp_path / "policies", basic_policy(id="renamed"))
        assert await reloader.reload("test") is True
        fixed = await scrape(client)
    assert value(broken, "slurmproxy_policy_loads_total", result="failure") == 1
    assert value(broken, "slurmproxy_policy_last_load_success") == 0
    assert value(fixed, "slurmproxy_policy_loads_total", result="success") == 2  # start-up and the reload
    assert value(fixed, "slurmproxy_policy_last_load_success") == 1
    assert value(fixed, "slurmproxy_policy_rules") == 1


# --- issue 15, item 9: metrics on a port of their own --------------------------------------------


@pytest.mark.anyio
@pytest.mark.httpx_mock(should_mock=lambda request: request.url.host != "127.0.0.1")  # the real listener
async def test_metrics_can_be_served_on_their_own_port_only(tmp_path: Path, signer: Signer, free_tcp_port: int) -> None:
    settings = make_settings(tmp_path, metrics={"port": free_tcp_port, "host": "127.0.0.1"})
    async with app_session(settings) as (client, _):
        assert (await client.get("/metrics")).status_code == 401  # not on the main port: a proxied path
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_tcp_port}") as scraper:
            scraped = await scraper.get("/metrics")
            other = await scraper.get("/slurm/v0.0.42/jobs")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    samples = {s.name: s for f in text_string_to_metric_families(scraped.text) for s in f.samples}
    assert samples["slurmproxy_policy_rules"].value == 1
    assert other.status_code == 404 and "slurmproxy_" not in other.text


@pytest.mark.anyio
async def test_the_metrics_port_closes_connections_that_send_nothing(
    tmp_path: Path, signer: Signer, free_tcp_port: int
) -> None:
    """The separate listener has the main port's header deadline: no connection stays open for ever."""
    import asyncio

    timeout = 0.5
    settings = make_settings(
        tmp_path, metrics={"port": free_tcp_port, "host": "127.0.0.1"}, server={"header_timeout_seconds": timeout}
    )
    async with app_session(settings):
        reader, writer = await asyncio.open_connection("127.0.0.1", free_tcp_port)
        writer.write(b"GET /metr")  # and then nothing
        async with asyncio.timeout(timeout + 30):  # the deadline plus a margin for a loaded machine
            answer = await reader.read()  # returns at EOF: the proxy closed the connection
        writer.close()
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408")


def test_the_metrics_port_must_differ_from_the_main_port(tmp_path: Path) -> None:
    from slurmproxy.errors import ConfigError

    with pytest.raises(ConfigError, match="metrics.port must differ from server.port"):
        make_settings(tmp_path, server={"port": 8080}, metrics={"port": 8080})
