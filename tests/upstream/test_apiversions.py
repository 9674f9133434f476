from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from slurmproxy.config.settings import Settings
from slurmproxy.errors import ApiVersionNotServedError
from slurmproxy.upstream import apiversions
from slurmproxy.upstream.apiversions import ApiVersions, ServedApis, parse_document
from slurmproxy.upstream.credentials import credentials_from
from slurmproxy.upstream.exchange import create_client
from tests.asgi import app_client
from tests.fakeupstream import ThreadedFakeSlurmrestd as Upstream
from tests.helpers import UPSTREAM, Signer, make_settings

DOC_URL = f"{UPSTREAM}/openapi/v3"
SLURM_2205 = ["/slurm/v0.0.38/ping", "/slurm/v0.0.38/jobs", "/slurm/v0.0.38/job/{job_id}", "/openapi/v3"]
SLURM_2411 = [f"/slurm/v0.0.{n}/{p}" for n in (40, 41, 42) for p in ("ping/", "jobs/", "job/{job_id}")]


def document(paths: list[str]) -> dict[str, Any]:
    return {"openapi": "3.0.3", "paths": {p: {"get": {}} for p in paths}}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(tmp_path: Path, upstream: Upstream) -> Settings:
    return make_settings(tmp_path, upstream={"api_versions_refresh_seconds": 300})


@pytest.fixture
async def tracker(settings: Settings, clock: FakeClock) -> AsyncIterator[ApiVersions]:
    client = create_client(settings.upstream)
    versions = ApiVersions(client, credentials_from(settings.upstream), settings.upstream, clock=clock)
    yield versions
    await versions.aclose()
    await client.aclose()


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        pytest.param(SLURM_2205, {"slurm": ["v0.0.38"]}, id="22.05"),
        pytest.param(SLURM_2411, {"slurm": ["v0.0.40", "v0.0.41", "v0.0.42"]}, id="24.11"),
        pytest.param(
            ["/slurm/v0.0.9/ping", "/slurm/v0.0.10/ping", "/slurmdb/v0.0.38/jobs"],
            {"slurm": ["v0.0.9", "v0.0.10"], "slurmdb": ["v0.0.38"]},
            id="numeric-order-and-slurmdb",
        ),
    ],
)
def test_parse_document(paths: list[str], expected: dict[str, list[str]]) -> None:
    assert parse_document(document(paths)).as_dict() == expected


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        pytest.param([], "not an OpenAPI document", id="list"),
        pytest.param({"openapi": "3.0"}, "not an OpenAPI document", id="no-paths"),
        pytest.param(document(["/openapi/v3"]), "no versioned paths", id="unversioned-only"),
    ],
)
def test_parse_document_refuses(doc: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_document(doc)


def test_served_versions_union_is_sorted() -> None:
    served = ServedApis({"slurmdb": ("v0.0.38",), "slurm": ("v0.0.38", "v0.0.40")})
    assert served.versions == ("v0.0.38", "v0.0.40")
    assert served.serves("slurm", "v0.0.40") and not served.serves("slurmdb", "v0.0.40")


@pytest.mark.anyio
async def test_document_is_read_as_the_discovery_user(upstream: Upstream, tracker: ApiVersions) -> None:
    upstream.add_response(url=DOC_URL, json=document(SLURM_2411))
    await tracker.refresh()
    assert tracker.versions == ("v0.0.40", "v0.0.41", "v0.0.42")
    assert tracker.report()["versions"] == {"slurm": ["v0.0.40", "v0.0.41", "v0.0.42"]}
    assert tracker.report()["error"] is None and tracker.report()["read_at"] is not None
    (sent,) = upstream.get_requests()
    assert sent.headers["x-slurm-user-name"] == "nobody"
    claims = jwt.decode(sent.headers["x-slurm-user-token"], OctKey.import_key(b"k" * 32), algorithms=["HS256"]).claims
    assert claims["sun"] == "nobody"
    assert "authorization" not in sent.headers


@pytest.mark.anyio
async def test_service_token_mode_sends_the_token_for_the_discovery_user(
    tmp_path: Path, upstream: Upstream, clock: FakeClock
) -> None:
    (tmp_path / "token").write_text("SLURM_JWT=service.token.value\n")
    section = {"auth": "service_token", "service_token_file": str(tmp_path / "token"), "discovery_user": "probe"}
    settings = make_settings(tmp_path, upstream=section)
    upstream.add_response(url=DOC_URL, json=document(SLURM_2205))
    async with create_client(settings.upstream) as client:
        await ApiVersions(client, credentials_from(settings.upstream), settings.upstream, clock=clock).refresh()
    sent = upstream.get_request()
    assert sent is not None
    assert sent.headers["x-slurm-user-name"] == "probe"
    assert sent.headers["x-slurm-user-token"] == "service.token.value"


@pytest.mark.anyio
async def test_unserved_version_is_404_listing_what_is_served(upstream: Upstream, tracker: ApiVersions) -> None:
    upstream.add_response(url=DOC_URL, json=document(SLURM_2411))
    await tracker.refresh()
    await tracker.check("/slurm/v0.0.41/jobs")
    await tracker.check("/openapi/v3")
    with pytest.raises(ApiVersionNotServedError) as err:
        await tracker.check("/slurm/v0.0.38/jobs")
    assert err.value.status_code == 404 and err.value.reason == "api_version_not_served"
    assert err.value.detail == "slurmrestd does not serve /slurm/v0.0.38/; it serves /slurm/ v0.0.40, v0.0.41, v0.0.42"
    assert err.value.fields == {"api_versions": {"slurm": ["v0.0.40", "v0.0.41", "v0.0.42"]}}
    with pytest.raises(ApiVersionNotServedError, match="serves no /slurmdb/ API; it serves /slurm/ v0.0.40"):
        await tracker.check("/slurmdb/v0.0.41/jobs")
    assert len(upstream.get_requests()) == 1  # refused from what is known: no re-read within ON_DEMAND_SECONDS


@pytest.mark.anyio
async def test_an_upgrade_is_noticed_on_demand(upstream: Upstream, tracker: ApiVersions, clock: FakeClock) -> None:
    upstream.add_response(url=DOC_URL, json=document(SLURM_2205))
    upstream.add_response(url=DOC_URL, json=document(SLURM_2411))
    await tracker.refresh()
    assert tracker.versions == ("v0.0.38",)
    clock.now += apiversions.ON_DEMAND_SECONDS
    await tracker.check("/slurm/v0.0.42/jobs")  # re-read: now served
    assert tracker.report()["versions"] == {"slurm": ["v0.0.40", "v0.0.41", "v0.0.42"]}
    with pytest.raises(ApiVersionNotServedError):
        await tracker.check("/slurm/v0.0.38/jobs")
    assert len(upstream.get_requests()) == 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        pytest.param({"status_code": 401, "text": "Authentication failure"}, "HTTP 401", id="401"),
        pytest.param({"status_code": 200, "text": "not json"}, "JSONDecodeError", id="not-json"),
        pytest.param({"status_code": 200, "json": document(["/openapi/v3"])}, "no versioned paths", id="no-versions"),
        pytest.param("close", "unreachable", id="down"),
    ],
)
@pytest.mark.anyio
async def test_a_failed_read_keeps_what_is_known(
    upstream: Upstream, tracker: ApiVersions, clock: FakeClock, answer: Any, error: str
) -> None:
    if isinstance(answer, str):
        upstream.add_exception(answer, url=DOC_URL, is_reusable=True)
    else:
        upstream.add_response(url=DOC_URL, is_reusable=True, **answer)
    await tracker.check("/slurm/v0.0.38/jobs")  # nothing known: forwarded, slurmrestd answers for itself
    assert tracker.served is None and error in (tracker.error or "")
    assert tracker.report() == {"versions": None, "read_at": None, "error": tracker.error}
    tracker.served = parse_document(document(SLURM_2205))
    clock.now += apiversions.ON_DEMAND_SECONDS
    with pytest.raises(ApiVersionNotServedError):
        await tracker.check("/slurm/v0.0.40/jobs")
    assert tracker.versions == ("v0.0.38",)


@pytest.mark.anyio
async def test_an_oversized_document_is_refused(
    upstream: Upstream, tracker: ApiVersions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apiversions, "MAX_DOCUMENT_BYTES", 100)
    upstream.add_response(url=DOC_URL, json=document(SLURM_2411))
    await tracker.refresh()
    assert tracker.served is None and "larger than 100 bytes" in (tracker.error or "")


@pytest.mark.anyio
async def test_background_reads_retry_until_slurmrestd_answers(
    upstream: Upstream, tracker: ApiVersions, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anyio

    monkeypatch.setattr(apiversions, "RETRY_SECONDS", 0.01)
    upstream.add_exception("close", url=DOC_URL)
    upstream.add_response(url=DOC_URL, json=document(SLURM_2205))
    tracker.start()
    with anyio.fail_after(5):
        while tracker.served is None:
            await anyio.sleep(0.01)
    assert tracker.versions == ("v0.0.38",) and tracker.error is None


@pytest.mark.anyio
async def test_discovery_off_reads_nothing_and_checks_nothing(
    tmp_path: Path, upstream: Upstream, clock: FakeClock
) -> None:
    settings = make_settings(tmp_path)  # api_versions_refresh_seconds: 0
    async with create_client(settings.upstream) as client:
        tracker = ApiVersions(client, credentials_from(settings.upstream), settings.upstream, clock=clock)
        tracker.start()
        await tracker.check("/slurm/v0.0.99/jobs")
        await tracker.aclose()
    assert "discovery off" in tracker.report()["status"]


@pytest.mark.anyio
async def test_the_proxy_answers_404_and_readiness_lists_the_versions(
    tmp_path: Path, settings: Settings, upstream: Upstream, signer: Signer
) -> None:
    upstream.add_response(url=DOC_URL, json=document(SLURM_2411), is_reusable=True)
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.42/jobs", json={"jobs": []})
    token = {"Authorization": f"Bearer {signer.token()}", "X-Request-ID": "old-version"}
    async with app_client(settings) as client:
        old = await client.get("/slurm/v0.0.38/jobs", headers=token)
        new = await client.get("/slurm/v0.0.42/jobs", headers={"Authorization": token["Authorization"]})
        ready = await client.get("/_slurmproxy/ready", headers=token)
    assert old.status_code == 404
    body = old.json()
    assert body["errors"][0]["source"] == "slurmproxy"
    assert body["errors"][0]["error"].endswith("it serves /slurm/ v0.0.40, v0.0.41, v0.0.42")
    assert body["slurmproxy"] == {
        "status": 404,
        "reason": "api_version_not_served",
        "request_id": "old-version",
        "api_versions": {"slurm": ["v0.0.40", "v0.0.41", "v0.0.42"]},
    }
    assert new.status_code == 200
    forwarded = [r.url.path for r in upstream.get_requests() if r.url.path.startswith("/slurm/")]
    assert forwarded == ["/slurm/v0.0.42/jobs"]
    assert ready.json()["checks"]["api_versions"]["versions"] == {"slurm": ["v0.0.40", "v0.0.41", "v0.0.42"]}
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    (record,) = [r for r in records if r["request_id"] == "old-version"]
    assert record["decision"] == "deny" and record["reason"] == "api_version_not_served"
    assert record["status"] == 404 and record["upstream_status"] is None and record["rule"] == "members"
