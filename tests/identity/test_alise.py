"""ALISE client contract tests: the documented answers (tests/samples/alise_*.json, the shapes of ALISE 1.1's
mapping API), timeouts, caches, single flight, outage modes, and the API key kept out of logs and errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import httpx
import pytest
from pytest_httpx import HTTPXMock

from slurmproxy.config.settings import AliseSettings
from slurmproxy.errors import ConfigError, DependencyError, IdentityMappingError
from slurmproxy.identity.alise import AliseClient

pytestmark = pytest.mark.anyio
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
BASE = "https://alise.example.org"
SITE = "vega-kc"
KEY = "s3cretAPIkeyNEVERlogged"
ISS = "https://aai.egi.eu/auth/realms/egi"


def sha1_hex(text: str) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


SUB = "0f3c2a7e9b1d4c6a8e0f2b4d6c8a0e1f3b5d7c9e1a3f5b7d9c1e3a5f7b9d1c3e@egi.eu"
PATH = f"/api/v1/target/{SITE}/mapping/issuer/{sha1_hex(ISS)}/user/{quote_plus(SUB)}"


def sample(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / f"alise_{name}.json").read_text())
    data.pop("_provenance")
    return data


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def settings(tmp_path: Path, **overrides: Any) -> AliseSettings:
    key = tmp_path / "alise.key"
    key.write_text(KEY + "\n")
    return AliseSettings(url=BASE + "/", site=SITE, apikey_file=key, **overrides)


def client(tmp_path: Path, clock: Clock, **overrides: Any) -> AliseClient:
    return AliseClient.create("egi", settings(tmp_path, **overrides), clock=clock)


def url(sub: str = SUB) -> str:
    return f"{BASE}{PATH.replace(quote_plus(SUB), quote_plus(sub))}?apikey={KEY}"


async def test_success_sample_gives_internal_username(tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=url(), json=sample("mapping_response.constructed"))
    alise = client(tmp_path, clock)
    answer = await alise.lookup(ISS, SUB)
    assert (answer.username, answer.via) == ("jdoe42", "alise")
    (request,) = httpx_mock.get_requests()
    assert request.url.raw_path.split(b"?")[0].decode() == PATH and request.url.params["apikey"] == KEY
    assert (await alise.lookup(ISS, SUB)).via == "cache"
    assert len(httpx_mock.get_requests()) == 1
    await alise.aclose()


async def test_issuer_hash_matches_the_dcache_client_vector(tmp_path: Path, clock: Clock) -> None:
    # dCache's gplazma2-alise test expects this sha1 for https://issuer.example.org/.
    alise = client(tmp_path, clock)
    assert "/issuer/95d86dadf13ccfbd25f13d5d15edb31b4b30c971/user/a%2Bb%40c" in alise.url_for(
        "https://issuer.example.org/", "a+b@c"
    )
    assert "apikey" not in alise.url_for(ISS, SUB)


async def test_hit_is_reused_only_for_cache_seconds(tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=url(), json=sample("mapping_response.constructed"), is_reusable=True)
    alise = client(tmp_path, clock, cache_seconds=60)
    await alise.lookup(ISS, SUB)
    clock.now += 59
    assert (await alise.lookup(ISS, SUB)).via == "cache"
    clock.now += 2
    assert (await alise.lookup(ISS, SUB)).via == "alise"
    assert len(httpx_mock.get_requests()) == 2


async def test_not_mapped_is_a_miss_cached_briefly(tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=url(), status_code=401, json=sample("error_not_mapped"), is_reusable=True)
    alise = client(tmp_path, clock, miss_cache_seconds=30)
    assert (await alise.lookup(ISS, SUB)).username is None
    assert (await alise.lookup(ISS, SUB)).via == "cache"
    clock.now += 31
    assert (await alise.lookup(ISS, SUB)).via == "alise"
    assert len(httpx_mock.get_requests()) == 2


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        pytest.param(401, sample("error_invalid_apikey"), "alise_rejected_key", id="401-invalid-apikey"),
        pytest.param(200, sample("error_exception_http200"), "alise_error", id="200-error-form"),
        pytest.param(500, {"detail": "boom"}, "alise_error", id="500"),
        pytest.param(422, {"detail": [{"msg": "Field required", "loc": ["query", "apikey"]}]}, "alise_error", id="422"),
        pytest.param(200, ["not", "an", "object"], "alise_error", id="200-not-an-object"),
        pytest.param(
            200,
            {**sample("mapping_response.constructed"), "external": [{"iss": ISS, "sub": "someone-else@egi.eu"}]},
            "alise_error",
            id="answer-for-another-identity",
        ),
    ],
)
async def test_failures_are_503_without_the_key(
    tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock, status: int, body: Any, reason: str
) -> None:
    httpx_mock.add_response(url=url(), status_code=status, json=body)
    with pytest.raises(DependencyError) as err:
        await client(tmp_path, clock).lookup(ISS, SUB)
    assert err.value.status_code == 503 and err.value.reason == reason
    assert KEY not in err.value.detail and KEY not in repr(err.value)


async def test_non_json_body_is_an_error(tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=url(), text="<html>bad gateway</html>", status_code=200)
    with pytest.raises(DependencyError, match="not a JSON object"):
        await client(tmp_path, clock).lookup(ISS, SUB)


@pytest.mark.parametrize(
    ("exception", "reason"),
    [
        pytest.param(httpx.ReadTimeout("timed out"), "alise_timeout", id="read-timeout"),
        pytest.param(httpx.ConnectTimeout("timed out"), "alise_timeout", id="connect-timeout"),
        pytest.param(httpx.ConnectError("refused"), "alise_unreachable", id="refused"),
        pytest.param(httpx.RemoteProtocolError("eof"), "alise_unreachable", id="protocol"),
    ],
)
async def test_transport_failures(
    tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock, exception: Exception, reason: str
) -> None:
    httpx_mock.add_exception(exception, url=url())
    with pytest.raises(DependencyError) as err:
        await client(tmp_path, clock).lookup(ISS, SUB)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "internal",
    [
        pytest.param({}, id="empty-object"),
        pytest.param({"username": {}}, id="username-object"),
        pytest.param({"username": ""}, id="empty-string"),
    ],
)
async def test_linked_without_username_is_refused(
    tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock, internal: dict[str, Any]
) -> None:
    httpx_mock.add_response(url=url(), json={**sample("mapping_response.constructed"), "internal": internal})
    with pytest.raises(IdentityMappingError) as err:
        await client(tmp_path, clock).lookup(ISS, SUB)
    assert err.value.reason == "invalid_username"


async def test_fail_closed_never_serves_a_stale_mapping(tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=url(), json=sample("mapping_response.constructed"))
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=url())
    alise = client(tmp_path, clock, cache_seconds=10)
    await alise.lookup(ISS, SUB)
    clock.now += 11
    with pytest.raises(DependencyError):
        await alise.lookup(ISS, SUB)


async def test_last_known_serves_within_max_age_only(tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=url(), json=sample("mapping_response.constructed"))
    httpx_mock.add_exception(httpx.ReadTimeout("slow"), url=url(), is_reusable=True)
    alise = client(tmp_path, clock, cache_seconds=10, outage="last_known", last_known_max_age_seconds=100)
    await alise.lookup(ISS, SUB)
    clock.now += 50
    stale = await alise.lookup(ISS, SUB)
    assert (stale.username, stale.via, stale.age_seconds) == ("jdoe42", "last_known", 50.0)
    clock.now += 51
    with pytest.raises(DependencyError) as err:
        await alise.lookup(ISS, SUB)
    assert err.value.reason == "alise_timeout"


async def test_last_known_does_not_cover_identities_never_seen(
    tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=url())
    with pytest.raises(DependencyError):
        await client(tmp_path, clock, outage="last_known").lookup(ISS, SUB)


async def test_concurrent_lookups_of_one_identity_share_one_request(
    tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock
) -> None:
    release = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200, json=sample("mapping_response.constructed"))

    httpx_mock.add_callback(slow, url=url())
    alise = client(tmp_path, clock)
    waiting = [asyncio.create_task(alise.lookup(ISS, SUB)) for _ in range(20)]
    await asyncio.sleep(0.05)
    waiting[0].cancel()  # one caller going away does not cancel the lookup for the others
    release.set()
    answers = await asyncio.gather(*waiting[1:])
    assert {a.username for a in answers} == {"jdoe42"}
    assert len(httpx_mock.get_requests()) == 1


async def test_caches_are_bounded(tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock) -> None:
    for n in range(3):
        body = sample("mapping_response.constructed")
        body["external"][0]["sub"] = f"user{n}"
        httpx_mock.add_response(url=url(f"user{n}"), json=body, is_reusable=True)
    alise = client(tmp_path, clock, cache_size=2)
    for n in range(3):
        await alise.lookup(ISS, f"user{n}")
    assert (await alise.lookup(ISS, "user2")).via == "cache"
    assert (await alise.lookup(ISS, "user0")).via == "alise"


async def test_subject_with_slash_is_not_looked_up(tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock) -> None:
    assert (await client(tmp_path, clock).lookup(ISS, "a/b")).username is None
    assert httpx_mock.get_requests() == []


async def test_same_subject_other_issuer_is_another_lookup(tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock) -> None:
    other = "https://other.example.org"
    httpx_mock.add_response(url=url(), json=sample("mapping_response.constructed"))
    other_url = url().replace(sha1_hex(ISS), sha1_hex(other))
    httpx_mock.add_response(url=other_url, status_code=401, json=sample("error_not_mapped"))
    alise = client(tmp_path, clock)
    assert (await alise.lookup(ISS, SUB)).username == "jdoe42"
    assert (await alise.lookup(other, SUB)).username is None


async def test_the_key_never_reaches_a_log_line(
    tmp_path: Path, clock: Clock, httpx_mock: HTTPXMock, caplog: pytest.LogCaptureFixture
) -> None:
    httpx_mock.add_response(url=url(), json=sample("mapping_response.constructed"))
    httpx_mock.add_response(url=url("x"), status_code=401, json=sample("error_invalid_apikey"))
    caplog.set_level(logging.DEBUG)
    alise = client(tmp_path, clock)
    await alise.lookup(ISS, SUB)
    with pytest.raises(DependencyError):
        await alise.lookup(ISS, "x")
    messages = [r.getMessage() for r in caplog.records]
    assert any("HTTP Request" in m for m in messages), messages  # httpx's own request line is there, redacted
    assert any(PATH.split("/user/")[0] in m for m in messages)
    assert all(KEY not in m for m in messages)


@pytest.mark.parametrize(
    "content",
    [pytest.param("", id="empty"), pytest.param("two words\n", id="two-words")],
)
async def test_bad_key_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    key = tmp_path / "k"
    key.write_text(content)
    with pytest.raises(ConfigError, match="apikey_file"):
        AliseClient.create("egi", AliseSettings(url=BASE, site=SITE, apikey_file=key))
    with pytest.raises(ConfigError, match="cannot read"):
        AliseClient.create("egi", AliseSettings(url=BASE, site=SITE, apikey_file=tmp_path / "missing"))
