from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import OctKey
from pytest_httpx import HTTPXMock

from tests.asgi import app_client
from tests.fakeupstream import Behaviour, ThreadedFakeSlurmrestd as Upstream
from tests.helpers import ISSUER, OTHER_VO, UPSTREAM, Signer, make_settings

pytestmark = pytest.mark.anyio
SUBMIT = "/slurm/v0.0.38/job/submit"
JOB = {"script": "#!/bin/bash\nid", "job": {"environment": {"PATH": "/bin"}, "current_working_directory": "/tmp"}}


def audit_lines(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_submit_is_forwarded_as_the_mapped_user(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{SUBMIT}", method="POST", json={"job_id": 42, "errors": []})
    settings = make_settings(tmp_path)
    headers = {
        "Authorization": f"Bearer {signer.token()}",
        "X-SLURM-USER-NAME": "root",
        "x_slurm_user_token": "forged",
        "X-Request-ID": "req-123",
    }
    async with app_client(settings) as client:
        response = await client.post(SUBMIT, json=JOB, headers=headers)
    assert response.status_code == 200
    assert response.json()["job_id"] == 42
    assert response.headers["x-request-id"] == "req-123"
    (sent,) = upstream.get_requests()
    assert json.loads(sent.content) == JOB
    assert sent.headers["x-slurm-user-name"] == "alice"
    assert "authorization" not in sent.headers
    assert sent.headers["x-request-id"] == "req-123"
    assert [k for k, _ in sent.headers.raw if k.lower().replace(b"_", b"-").startswith(b"x-slurm-")] == [
        b"x-slurm-user-name",
        b"x-slurm-user-token",
    ]
    claims = jwt.decode(sent.headers["x-slurm-user-token"], OctKey.import_key(b"k" * 32), algorithms=["HS256"]).claims
    assert claims["sun"] == "alice"
    intent, record = audit_lines(tmp_path)
    assert (intent["kind"], intent["decision"], intent["status"], intent["request_id"]) == (
        "intent",
        "allow",
        None,
        "req-123",
    )
    assert (intent["local_user"], intent["rule"], intent["operation"]) == ("alice", "members", "submit")
    assert record["kind"] == "outcome" and record["decision"] == "allow"
    assert record["job_id"] == 42
    assert record["local_user"] == "alice" and record["mapping"] == "table:users"
    assert record["rule"] == "members" and record["operation"] == "submit"
    assert record["issuer"] == ISSUER and record["subject"] == "alice@example.org"
    assert record["status"] == 200 and record["upstream_status"] == 200
    assert record["client"] == "203.0.113.5"


async def test_unmapped_subject_uses_service_account(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.38/jobs", json={"jobs": []})
    async with app_client(make_settings(tmp_path)) as client:
        response = await client.get(
            "/slurm/v0.0.38/jobs", headers={"Authorization": f"Bearer {signer.token(sub='bob@example.org')}"}
        )
    assert response.status_code == 200
    assert upstream.get_requests()[0].headers["x-slurm-user-name"] == "svc-alpha"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param({}, "missing_token", id="no-token"),
        pytest.param({"Authorization": "Bearer not-a-jwt"}, "malformed_token", id="malformed"),
    ],
)
async def test_unauthenticated_requests_get_401(
    tmp_path: Path, signer: Signer, headers: dict[str, str], reason: str, upstream: Upstream
) -> None:
    # `signer` answers the key fetch the app starts in the background (whether it runs before the test
    # ends depends on timing); the request itself makes none.
    async with app_client(make_settings(tmp_path)) as client:
        response = await client.get("/slurm/v0.0.38/jobs", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert body["slurmproxy"]["reason"] == reason
    assert body["errors"][0]["source"] == "slurmproxy"
    assert upstream.get_requests() == []
    (record,) = audit_lines(tmp_path)
    assert record["decision"] == "deny" and record["reason"] == reason and record["status"] == 401


async def test_401_body_never_echoes_the_token(tmp_path: Path, signer: Signer) -> None:
    token = signer.token(aud="other")
    async with app_client(make_settings(tmp_path)) as client:
        response = await client.get("/slurm/v0.0.38/jobs", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.json()["slurmproxy"]["reason"] == "wrong_audience"
    assert token not in response.text and token not in str(response.headers)
    assert token not in (tmp_path / "audit.log").read_text()


async def test_no_entitlement_gets_403_and_nothing_reaches_slurm(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    async with app_client(make_settings(tmp_path)) as client:
        response = await client.post(
            SUBMIT, json=JOB, headers={"Authorization": f"Bearer {signer.token(eduperson_entitlement=[OTHER_VO])}"}
        )
    assert response.status_code == 403
    assert response.json()["slurmproxy"]["reason"] == "no_rule_matches"
    assert "no rule allows POST /slurm/v0.0.38/job/submit" in response.json()["errors"][0]["error"]
    assert upstream.get_requests() == []
    (record,) = audit_lines(tmp_path)
    assert record["decision"] == "deny" and record["status"] == 403 and record["local_user"] is None


async def test_mapping_to_a_refused_account_is_403(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    from tests.helpers import basic_policy

    policy = basic_policy(mapping=[{"service_account": "root"}])
    async with app_client(make_settings(tmp_path, policy)) as client:
        response = await client.get(
            "/slurm/v0.0.38/jobs", headers={"Authorization": f"Bearer {signer.token(sub='bob')}"}
        )
    assert response.status_code == 403
    assert response.json()["slurmproxy"]["reason"] == "account_refused"
    assert upstream.get_requests() == []
    (record,) = audit_lines(tmp_path)
    assert record["reason"] == "account_refused" and "root" in record["detail"]


@pytest.mark.parametrize(
    ("exception", "status", "reason"),
    [
        pytest.param("close", 502, "upstream_unreachable", id="closed"),
        pytest.param("hang", 504, "upstream_timeout", id="timeout"),
        pytest.param("garbage", 502, "upstream_unreachable", id="protocol"),
    ],
)
async def test_upstream_failures(
    tmp_path: Path, signer: Signer, upstream: Upstream, exception: Behaviour, status: int, reason: str
) -> None:
    upstream.add_exception(exception, url=f"{UPSTREAM}/slurm/v0.0.38/jobs", is_reusable=True)
    async with app_client(make_settings(tmp_path, upstream={"timeout_seconds": 0.3})) as client:
        response = await client.get("/slurm/v0.0.38/jobs", headers={"Authorization": f"Bearer {signer.token()}"})
    assert response.status_code == status
    body = response.json()
    assert body["errors"][0]["error_number"] == status and body["slurmproxy"]["reason"] == reason
    (record,) = audit_lines(tmp_path)
    assert record["decision"] == "error" and record["status"] == status and record["local_user"] == "alice"


async def test_oversized_body_is_refused_before_forwarding(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    async with app_client(make_settings(tmp_path, server={"max_body_bytes": 2048})) as client:
        response = await client.post(SUBMIT, content=b"x" * 4096, headers={"Authorization": f"Bearer {signer.token()}"})
    assert response.status_code == 413
    assert upstream.get_requests() == []


async def test_bad_path_is_400_before_authentication(tmp_path: Path, signer: Signer) -> None:
    async with app_client(make_settings(tmp_path)) as client:
        response = await client.get("/slurm/v0.0.38/%2e%2e/jobs")
    assert response.status_code == 400
    assert response.json()["slurmproxy"]["reason"] == "bad_path"
    assert audit_lines(tmp_path)[0]["status"] == 400


async def test_streamed_response_passes_through(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    big = {"jobs": [{"job_id": n, "name": "x" * 100} for n in range(2000)]}
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.38/jobs", json=big, headers={"X-Upstream": "yes"})
    async with app_client(make_settings(tmp_path)) as client:
        response = await client.get("/slurm/v0.0.38/jobs", headers={"Authorization": f"Bearer {signer.token()}"})
    assert response.json() == big
    assert response.headers["x-upstream"] == "yes"


async def test_audit_failure_fails_closed(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    settings = make_settings(tmp_path, audit={"sink": "file", "file": "/dev/full"})
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.38/jobs", json={"jobs": []}, is_optional=True)
    async with app_client(settings) as client:
        response = await client.get("/slurm/v0.0.38/jobs", headers={"Authorization": f"Bearer {signer.token()}"})
    assert response.status_code == 503
    assert response.json()["slurmproxy"]["reason"] == "audit_unavailable"


async def test_live_and_ready(tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream) -> None:
    upstream.add_response(url=f"{UPSTREAM}/openapi/v3", json={"openapi": "3.0"})
    async with app_client(make_settings(tmp_path)) as client:
        assert (await client.get("/_slurmproxy/live")).json() == {"status": "ok"}
        ready = await client.get("/_slurmproxy/ready", headers={"Authorization": f"Bearer {signer.token()}"})
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["issuers"] == {ISSUER: "keys loaded"}


async def test_not_ready_when_upstream_is_down(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_exception("close", url=f"{UPSTREAM}/openapi/v3")
    async with app_client(make_settings(tmp_path)) as client:
        ready = await client.get("/_slurmproxy/ready", headers={"Authorization": f"Bearer {signer.token()}"})
    assert ready.status_code == 503
    assert "unreachable" in ready.json()["checks"]["upstream"]


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="no-token"),
        pytest.param("Bearer not-a-jwt", id="bad-token"),
        pytest.param("outsider", id="a-valid-token-no-rule-admits"),
    ],
)
async def test_ready_tells_only_the_status_to_whoever_the_policy_does_not_admit(
    tmp_path: Path, signer: Signer, upstream: Upstream, caplog: pytest.LogCaptureFixture, authorization: str | None
) -> None:
    """Issue 15, item 9: readiness details (the policy's loader errors with file paths and federated
    subjects, slurmrestd's state) are not for anyone who can reach the port; the log has them."""
    upstream.add_exception("close", url=f"{UPSTREAM}/openapi/v3")
    if authorization == "outsider":
        authorization = f"Bearer {signer.token(eduperson_entitlement=[OTHER_VO])}"
    headers = {"Authorization": authorization} if authorization else {}
    async with app_client(make_settings(tmp_path)) as client:
        ready = await client.get("/_slurmproxy/ready", headers=headers)
    assert ready.status_code == 503
    assert ready.json() == {"status": "not ready"}
    logged = [r for r in caplog.records if r.name == "slurmproxy" and "readiness" in r.getMessage()]
    assert logged and "unreachable" in logged[-1].getMessage() and logged[-1].levelname == "WARNING"


async def test_provider_outage_is_503_json_for_a_checkin_token(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    userinfo = f"{ISSUER}/protocol/openid-connect/userinfo"
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=userinfo)
    issuer = {"preset": "egi-checkin", "issuer": ISSUER, "userinfo_endpoint": userinfo}
    token = signer.token(aud=None, eduperson_entitlement=None, typ="Bearer")
    async with app_client(make_settings(tmp_path, oidc={"issuers": [issuer]})) as client:
        response = await client.get("/slurm/v0.0.38/jobs", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert "www-authenticate" not in response.headers
    assert response.json()["slurmproxy"]["reason"] == "provider_unreachable"
    assert upstream.get_requests() == []
    (record,) = audit_lines(tmp_path)
    assert record["decision"] == "error" and record["status"] == 503 and record["reason"] == "provider_unreachable"
    assert token not in (tmp_path / "audit.log").read_text()


@pytest.mark.parametrize(
    ("trusted", "client"),
    [
        pytest.param([], "203.0.113.5", id="untrusted-peer"),
        pytest.param(["203.0.113.0/24"], "198.51.100.20", id="trusted-peer"),
    ],
)
async def test_audit_client_comes_from_forwarding_headers_only_behind_a_trusted_proxy(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, trusted: list[str], client: str, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.38/job/77", json={"jobs": []})
    headers = {
        "Authorization": f"Bearer {signer.token()}",
        "X-Forwarded-For": "10.6.6.6, 198.51.100.20",
        "User-Agent": "interlink/1.0",
    }
    async with app_client(make_settings(tmp_path, server={"trusted_proxies": trusted})) as http:
        response = await http.get("/slurm/v0.0.38/job/77", headers=headers)
    assert response.status_code == 200
    (record,) = audit_lines(tmp_path)
    assert record["client"] == client and record["peer"] == "203.0.113.5"
    assert record["user_agent"] == "interlink/1.0"
    assert record["vo"] == "vo.example.org" and record["vos"] == ["vo.example.org"]
    assert record["job_id"] == 77 and record["operation"] == "read-only"
    assert record["upstream_ms"] is not None and record["latency_ms"] >= record["upstream_ms"]


async def test_identical_concurrent_gets_share_one_upstream_request(
    tmp_path: Path, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.38/jobs", json={"jobs": [1]}, delay=0.3)
    headers = {"Authorization": f"Bearer {signer.token()}"}
    async with app_client(make_settings(tmp_path)) as client:
        answers = await asyncio.gather(*(client.get("/slurm/v0.0.38/jobs", headers=headers) for _ in range(20)))
    assert [a.status_code for a in answers] == [200] * 20
    assert {a.content for a in answers} == {b'{"jobs": [1]}'}
    assert len(upstream.get_requests()) == 1
    records = audit_lines(tmp_path)
    assert len(records) == 20 and len({r["request_id"] for r in records}) == 20
    assert sorted(r["served_from"] for r in records) == ["coalesced"] * 19 + ["upstream"]
    assert {r["local_user"] for r in records} == {"alice"}


async def test_response_cache_is_per_local_account_and_bounded_by_its_ttl(
    tmp_path: Path, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.38/jobs", json={"jobs": ["alice"]})
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.38/jobs", json={"jobs": ["svc"]})
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.38/jobs", json={"jobs": ["alice-later"]})
    settings = make_settings(tmp_path, shield={"cache": [{"path": "/slurm/{version}/jobs", "ttl_seconds": 0.5}]})
    alice = {"Authorization": f"Bearer {signer.token()}"}
    bob = {"Authorization": f"Bearer {signer.token(sub='bob@example.org')}"}  # mapped to svc-alpha
    async with app_client(settings) as client:
        first = await client.get("/slurm/v0.0.38/jobs", headers=alice)
        again = await client.get("/slurm/v0.0.38/jobs", headers=alice)
        other = await client.get("/slurm/v0.0.38/jobs", headers=bob)
        await asyncio.sleep(0.6)
        later = await client.get("/slurm/v0.0.38/jobs", headers=alice)
    assert first.json() == again.json() == {"jobs": ["alice"]}
    assert "age" in again.headers and "age" not in first.headers
    assert other.json() == {"jobs": ["svc"]}
    assert later.json() == {"jobs": ["alice-later"]}
    assert [r.headers["x-slurm-user-name"] for r in upstream.get_requests()] == ["alice", "svc-alpha", "alice"]
    assert [r["served_from"] for r in audit_lines(tmp_path)] == ["upstream", "cache", "upstream", "upstream"]


async def test_a_bug_still_gets_json_and_a_record(
    tmp_path: Path, signer: Signer, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slurmproxy.identity import IdentityMapper

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(IdentityMapper, "map", broken)
    async with app_client(make_settings(tmp_path)) as client:
        response = await client.get("/slurm/v0.0.38/jobs", headers={"Authorization": f"Bearer {signer.token()}"})
    assert response.status_code == 500
    assert response.json()["slurmproxy"]["reason"] == "internal_error"
    (record,) = audit_lines(tmp_path)
    assert record["status"] == 500 and record["decision"] == "error" and record["subject"] == "alice@example.org"
    assert upstream.get_requests() == []


async def test_requests_that_differ_in_a_forwarded_header_are_not_coalesced(
    tmp_path: Path, signer: Signer, upstream: Upstream
) -> None:
    jobs = f"{UPSTREAM}/slurm/v0.0.38/jobs"
    upstream.add_response(url=jobs, json={"jobs": []}, delay=0.3, is_reusable=True)
    auth = f"Bearer {signer.token()}"
    json_, yaml, json_other_agent = (
        {"Authorization": auth, "Accept": "application/json", "User-Agent": "a"},
        {"Authorization": auth, "Accept": "application/x-yaml", "User-Agent": "a"},
        {"Authorization": auth, "Accept": "application/json", "User-Agent": "b"},
    )
    async with app_client(make_settings(tmp_path)) as client:
        answers = await asyncio.gather(
            *(client.get("/slurm/v0.0.38/jobs", headers=h) for h in (json_, yaml, json_other_agent))
        )
    assert [a.status_code for a in answers] == [200] * 3
    assert sorted(r.headers["accept"] for r in upstream.get_requests()) == ["application/json", "application/x-yaml"]
    assert sorted(r["served_from"] for r in audit_lines(tmp_path)) == ["coalesced", "upstream", "upstream"]


async def test_gets_with_a_body_are_never_shared(tmp_path: Path, signer: Signer, upstream: Upstream) -> None:
    """Nor forwarded at all since issue 15 (item 4): slurmrestd reads no body on a GET."""
    headers = {"Authorization": f"Bearer {signer.token()}"}
    async with app_client(make_settings(tmp_path)) as client:
        answers = await asyncio.gather(
            *(client.request("GET", "/slurm/v0.0.38/jobs", headers=headers, content=b"{}") for _ in range(2))
        )
    assert [a.json()["slurmproxy"]["reason"] for a in answers] == ["body_not_allowed"] * 2
    assert upstream.get_requests() == []


async def test_an_unsized_answer_too_large_to_share_reaches_its_caller_whole(
    tmp_path: Path, signer: Signer, upstream: Upstream
) -> None:
    big = b"x" * 5000
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.38/jobs", content=big, chunked=True)
    settings = make_settings(tmp_path, shield={"max_body_bytes": 1024})
    async with app_client(settings) as client:
        response = await client.get("/slurm/v0.0.38/jobs", headers={"Authorization": f"Bearer {signer.token()}"})
    assert response.status_code == 200 and response.content == big


# --- issue 15, item 8: one Content-Type, and the proxy's own for job bodies -----------------------


@pytest.mark.parametrize(
    "second",
    [pytest.param(("Content-Type", "application/x-yaml"), id="two-content-types"),
     pytest.param(("content_type", "application/x-yaml"), id="underscore-spelling")],
)  # fmt: skip
async def test_two_content_types_are_refused(
    tmp_path: Path, signer: Signer, upstream: Upstream, second: tuple[str, str]
) -> None:
    """The proxy checked the first, slurmrestd read the last: two are never passed on."""
    headers = [("Authorization", f"Bearer {signer.token()}"), ("Content-Type", "application/json"), second]
    async with app_client(make_settings(tmp_path)) as client:
        response = await client.post(SUBMIT, content=json.dumps(JOB), headers=headers)
    assert response.status_code == 400
    assert response.json()["slurmproxy"]["reason"] == "duplicate_content_type"
    assert upstream.get_requests() == []


async def test_a_job_body_goes_out_with_the_proxys_own_content_type(
    tmp_path: Path, signer: Signer, upstream: Upstream
) -> None:
    """`Connection: content-type` would strip the checked header after the check; the proxy sets it."""
    upstream.add_response(url=f"{UPSTREAM}{SUBMIT}", method="POST", json={"job_id": 7, "errors": []})
    headers = {
        "Authorization": f"Bearer {signer.token()}",
        "Content-Type": "application/json; charset=utf-8",
        "Connection": "content-type",
    }
    async with app_client(make_settings(tmp_path)) as client:
        response = await client.post(SUBMIT, content=json.dumps(JOB), headers=headers)
    assert response.status_code == 200
    (sent,) = upstream.get_requests()
    assert [v for k, v in sent.headers.raw if k.lower() == b"content-type"] == [b"application/json"]
