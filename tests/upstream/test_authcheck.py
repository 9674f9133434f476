"""Rejected proxy credentials versus the job's own errors, with slurmrestd's real answers (devstack/README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest_httpx import HTTPXMock

from slurmproxy.upstream import authcheck
from slurmproxy.upstream.authcheck import classify, slurm_errors
from tests.asgi import app_client
from tests.fakeupstream import ThreadedFakeSlurmrestd as Upstream
from tests.helpers import UPSTREAM, Signer, basic_policy, make_settings

V38_JOBS = "/slurm/v0.0.38/jobs"
V38_SUBMIT = "/slurm/v0.0.38/job/submit"
V42_JOBS = "/slurm/v0.0.42/jobs"
PROBE = f"{UPSTREAM}/slurm/v0.0.38/job/0"


def errors(*entries: Any) -> bytes:
    return json.dumps({"meta": {"plugin": {"type": "openapi/v0.0.38"}}, "errors": list(entries)}).encode()


LOAD_JOBS_UNSPECIFIED = errors(
    {"description": "Failed while looking for jobs", "error_number": -1, "error": "Unspecified error"}
)
SUBMIT_ZERO_BYTES = errors({"error_code": 5005, "error": "Zero Bytes were transmitted or received"})
KILL_ZERO_BYTES = errors({"error_number": 5005, "error": "Zero Bytes were transmitted or received"})
NODES_UNSPECIFIED = errors({"error": "Unspecified error", "errno": -1})
UPDATE_UNEXPECTED = errors({"error_number": 1000, "error": "Unexpected message received", "source": "_parse_job_list"})
BAD_PARTITION = errors({"error_code": 2000, "error": "Invalid partition name specified"})
INVALID_JOB = errors({"error_number": 2017, "error": "Invalid job id specified", "source": "slurm_kill_job"})
CTLD_DOWN = errors({"error_code": 1800, "error": "Unable to contact slurm controller (connect failure)"})
DB_7000 = errors({"error_number": 7000, "error": "Unable to connect to database", "source": "slurmdb_connection_get"})
AUTH_1007 = errors({"error_number": 1007, "error": "Protocol authentication error", "source": "slurm_load_jobs()"})


@pytest.mark.parametrize(
    ("status", "body", "version", "verdict", "root"),
    [
        pytest.param(401, b"Authentication failure", None, "rejected", "slurm", id="rest-auth-401"),
        pytest.param(511, AUTH_1007, "v0.0.42", "rejected", "slurm", id="24.11-511"),
        pytest.param(511, b"", "v0.0.42", "rejected", "slurm", id="24.11-511-no-body"),
        pytest.param(500, AUTH_1007, "v0.0.41", "rejected", "slurm", id="23.02-24.05-500-1007"),
        pytest.param(500, LOAD_JOBS_UNSPECIFIED, "v0.0.38", "ambiguous", "slurm", id="22.05-read"),
        pytest.param(500, NODES_UNSPECIFIED, "v0.0.38", "ambiguous", "slurm", id="22.05-nodes-errno"),
        pytest.param(500, SUBMIT_ZERO_BYTES, "v0.0.38", "ambiguous", "slurm", id="22.05-submit"),
        pytest.param(500, KILL_ZERO_BYTES, "v0.0.37", "ambiguous", "slurm", id="22.05-older-plugin"),
        pytest.param(500, UPDATE_UNEXPECTED, "v0.0.38", "ambiguous", "slurm", id="22.05-update"),
        pytest.param(500, BAD_PARTITION, "v0.0.38", "other", "slurm", id="22.05-bad-partition"),
        pytest.param(500, INVALID_JOB, "v0.0.38", "other", "slurm", id="22.05-unknown-job"),
        pytest.param(500, CTLD_DOWN, "v0.0.38", "other", "slurm", id="22.05-slurmctld-down-on-submit"),
        pytest.param(500, LOAD_JOBS_UNSPECIFIED, "v0.0.40", "other", "slurm", id="24.11-unspecified"),
        pytest.param(500, BAD_PARTITION, "v0.0.42", "other", "slurm", id="24.11-bad-partition"),
        pytest.param(500, b"<html>oops</html>", "v0.0.38", "other", "slurm", id="not-json"),
        pytest.param(500, LOAD_JOBS_UNSPECIFIED, None, "other", "slurm", id="unversioned-path"),
        pytest.param(502, CTLD_DOWN, "v0.0.42", "other", "slurm", id="24.11-502"),
        pytest.param(502, DB_7000, "v0.0.42", "other", "slurm", id="24.11-slurm-7000"),
        pytest.param(502, DB_7000, "v0.0.42", "ambiguous", "slurmdb", id="24.11-slurmdb-7000"),
        pytest.param(502, DB_7000, "v0.0.45", "ambiguous", "slurmdb", id="26.05-slurmdb-7000"),
        pytest.param(502, CTLD_DOWN, "v0.0.45", "other", "slurmdb", id="26.05-slurmdb-other"),
        pytest.param(200, AUTH_1007, "v0.0.38", "rejected", "slurmdb", id="22.05-slurmdb-200-1007"),
        pytest.param(511, AUTH_1007, "v0.0.45", "rejected", "slurm", id="26.05-511"),
    ],
)
def test_classify(status: int, body: bytes, version: str | None, verdict: str, root: str) -> None:
    assert classify(status, body, version, root)[0] == verdict


@pytest.mark.parametrize(
    ("status", "api", "inspected"),
    [
        (200, ("slurm", "v0.0.38"), False),
        (200, ("slurmdb", "v0.0.38"), True),
        (200, ("slurmdb", "v0.0.42"), False),
        (502, ("slurmdb", "v0.0.42"), True),
        (502, ("slurm", "v0.0.45"), False),
        (511, None, True),
    ],
)
def test_which_answers_are_inspected(status: int, api: tuple[str, str] | None, inspected: bool) -> None:
    assert authcheck.inspected(status, api) is inspected


def test_slurm_errors_reads_every_spelling_of_the_number() -> None:
    body = errors({"error_code": 5005, "error": "a"}, {"errno": -1, "error": "b"}, {"error_number": 2}, "junk")
    assert slurm_errors(body) == [(5005, "a"), (-1, "b"), (2, "")]
    assert slurm_errors(b'{"errors": "no"}') == [] and slurm_errors(b"[]") == []


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]


def slurm_tokens(upstream: Upstream) -> set[str]:
    return {r.headers["x-slurm-user-token"] for r in upstream.get_requests() if "x-slurm-user-token" in r.headers}


async def _get(tmp_path: Path, signer: Signer, *paths: str, method: str = "GET") -> list[httpx.Response]:
    async with app_client(make_settings(tmp_path)) as client:
        headers = {"Authorization": f"Bearer {signer.token()}"}
        answers = [await client.request(method, p, headers=headers) for p in paths]
        answers.append(await client.get("/_slurmproxy/ready", headers=headers))
    return answers


@pytest.mark.anyio
async def test_24_11_rejection_is_502_without_slurms_body_or_token(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{V42_JOBS}", status_code=511, content=AUTH_1007)
    upstream.add_response(url=f"{UPSTREAM}/openapi/v3", status_code=401, text="Authentication failure")
    response, ready = await _get(tmp_path, signer, V42_JOBS)
    assert response.status_code == 502
    body = response.json()
    assert body["slurmproxy"]["reason"] == "upstream_auth_failed"
    assert body["errors"][0]["source"] == "slurmproxy"
    assert "HTTP 511: Slurm error 1007 Protocol authentication error" in body["errors"][0]["error"]
    assert "not a problem with your token" in body["errors"][0]["error"]
    (token,) = slurm_tokens(upstream)
    assert token not in response.text and token not in (tmp_path / "audit.log").read_text()
    (record,) = audit(tmp_path)
    assert record["decision"] == "error" and record["reason"] == "upstream_auth_failed"
    assert record["status"] == 502 and record["upstream_status"] == 511 and record["local_user"] == "alice"
    credential = ready.json()["checks"]["upstream_credential"]
    assert credential["rejections"] == 1 and credential["last"]["status"] == 511


@pytest.mark.anyio
async def test_rest_auth_401_is_the_proxys_problem_not_the_callers(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{V42_JOBS}", status_code=401, text="Authentication failure")
    upstream.add_response(url=f"{UPSTREAM}/openapi/v3", status_code=401, text="Authentication failure")
    response, _ = await _get(tmp_path, signer, V42_JOBS)
    assert response.status_code == 502 and response.json()["slurmproxy"]["reason"] == "upstream_auth_failed"
    assert "www-authenticate" not in response.headers


@pytest.mark.parametrize("first", [LOAD_JOBS_UNSPECIFIED, SUBMIT_ZERO_BYTES])
@pytest.mark.anyio
async def test_22_05_rejection_is_confirmed_by_one_probe(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, first: bytes, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{V38_JOBS}", status_code=500, content=first, is_reusable=True)
    upstream.add_response(url=PROBE, method="DELETE", status_code=500, content=KILL_ZERO_BYTES)
    upstream.add_response(url=f"{UPSTREAM}/openapi/v3", status_code=401, text="Authentication failure")
    one, two, ready = await _get(tmp_path, signer, V38_JOBS, V38_JOBS)
    for response in (one, two):
        assert response.status_code == 502, response.text
        assert response.json()["slurmproxy"]["reason"] == "upstream_auth_failed"
    probes = [r for r in upstream.get_requests() if r.method == "DELETE"]
    assert len(probes) == 1  # the second failure reuses the probe's answer
    jobs = [r for r in upstream.get_requests() if r.url.path == V38_JOBS]
    assert probes[0].headers["x-slurm-user-name"] == "alice"
    assert probes[0].headers["x-slurm-user-token"] == jobs[0].headers["x-slurm-user-token"]
    assert ready.json()["checks"]["upstream_credential"]["rejections"] == 2


@pytest.mark.parametrize(
    "probe",
    [
        pytest.param({"status_code": 500, "content": INVALID_JOB}, id="credential-accepted"),
        pytest.param({"status_code": 500, "content": CTLD_DOWN}, id="slurmctld-down"),
        pytest.param("hang", id="probe-timeout"),
    ],
)
@pytest.mark.anyio
async def test_22_05_other_failures_pass_through_unchanged(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, probe: Any, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{V38_JOBS}", status_code=500, content=LOAD_JOBS_UNSPECIFIED)
    if isinstance(probe, str):
        upstream.add_exception(probe, url=PROBE, method="DELETE")
    else:
        upstream.add_response(url=PROBE, method="DELETE", **probe)
    upstream.add_response(url=f"{UPSTREAM}/openapi/v3", status_code=401, text="Authentication failure")
    response, ready = await _get(tmp_path, signer, V38_JOBS)
    assert response.status_code == 500 and response.content == LOAD_JOBS_UNSPECIFIED
    (record,) = audit(tmp_path)
    assert record["decision"] == "allow" and record["status"] == 500 and record["upstream_status"] == 500
    assert ready.json()["checks"]["upstream_credential"] == {"rejections": 0}


@pytest.mark.parametrize(
    ("path", "method", "status", "content"),
    [
        pytest.param(V38_SUBMIT, "POST", 500, BAD_PARTITION, id="22.05-bad-partition"),
        pytest.param("/slurm/v0.0.38/job/7", "DELETE", 500, INVALID_JOB, id="22.05-unknown-job"),
        pytest.param("/slurm/v0.0.42/job/submit", "POST", 500, BAD_PARTITION, id="24.11-bad-partition"),
        pytest.param(V38_JOBS, "GET", 500, b'{"errors": [' + b'{"error": "x"},' * 8000 + b"{}]}", id="large"),
        pytest.param(V38_JOBS, "GET", 200, b'{"jobs": []}', id="ok"),
    ],
)
@pytest.mark.anyio
async def test_job_errors_pass_through_without_a_probe(
    tmp_path: Path,
    httpx_mock: HTTPXMock,
    signer: Signer,
    path: str,
    method: str,
    status: int,
    content: bytes,
    upstream: Upstream,
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{path}", method=method, status_code=status, content=content)
    async with app_client(make_settings(tmp_path)) as client:
        headers = {"Authorization": f"Bearer {signer.token()}"}
        kwargs: dict[str, Any] = {"json": {"script": "#!/bin/sh\n", "job": {}}} if method == "POST" else {}
        response = await client.request(method, path, headers=headers, **kwargs)
    assert response.status_code == status
    assert response.content == content
    assert not [r for r in upstream.get_requests() if r.url.path.endswith("/job/0")]


@pytest.mark.anyio
async def test_compressed_error_bodies_are_not_inspected(tmp_path: Path, signer: Signer, upstream: Upstream) -> None:
    upstream.add_response(
        url=f"{UPSTREAM}{V42_JOBS}", status_code=500, content=AUTH_1007, headers={"Content-Encoding": "br"}
    )
    async with app_client(make_settings(tmp_path)) as client:
        response = await client.get(V42_JOBS, headers={"Authorization": f"Bearer {signer.token()}"})
    assert response.status_code == 500 and response.content == AUTH_1007


ACCOUNTING_POLICY = basic_policy(allow=["read-only", "read-accounting"])
DB_JOBS = "/slurmdb/v0.0.45/jobs"
LICENSES = f"{UPSTREAM}/slurm/v0.0.45/licenses"


@pytest.mark.parametrize(
    ("probe", "status", "reason"),
    [
        pytest.param({"status_code": 511, "content": AUTH_1007}, 502, "upstream_auth_failed", id="credential-rejected"),
        pytest.param({"status_code": 200, "json": {"licenses": []}}, 502, None, id="slurmdbd-down"),
    ],
)
@pytest.mark.anyio
async def test_accounting_502_is_told_apart_by_a_probe_of_slurmctld(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream, probe: Any, status: int, reason: Any
) -> None:
    """24.11 and 26.05 answer /slurmdb with a rejected credential exactly as with slurmdbd down."""
    upstream.add_response(url=f"{UPSTREAM}{DB_JOBS}", status_code=502, content=DB_7000)
    upstream.add_response(url=LICENSES, **probe)
    async with app_client(make_settings(tmp_path, ACCOUNTING_POLICY)) as client:
        response = await client.get(DB_JOBS, headers={"Authorization": f"Bearer {signer.token()}"})
    assert response.status_code == status
    if reason is None:
        assert response.content == DB_7000  # slurmdbd's own answer, passed on
    else:
        assert response.json()["slurmproxy"]["reason"] == reason
    (probe_request,) = [r for r in upstream.get_requests() if r.url.path.endswith("/licenses")]
    jobs = [r for r in upstream.get_requests() if r.url.path == DB_JOBS]
    assert probe_request.headers["x-slurm-user-token"] == jobs[0].headers["x-slurm-user-token"]


@pytest.mark.anyio
async def test_22_05_accounting_200_with_1007_is_a_rejection(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}/slurmdb/v0.0.38/jobs", status_code=200, content=AUTH_1007)
    async with app_client(make_settings(tmp_path, ACCOUNTING_POLICY)) as client:
        response = await client.get("/slurmdb/v0.0.38/jobs", headers={"Authorization": f"Bearer {signer.token()}"})
    assert response.status_code == 502 and response.json()["slurmproxy"]["reason"] == "upstream_auth_failed"
