"""The request attack corpus: forged identity headers, CR/LF injection, path tricks, methods and
bodies, sent as raw bytes where a client library would refuse or repair them. Each is checked on
slurmrestd's side too: its own log of what it received, slurmctld's RPC counts, Slurm's job list.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack import SlurmCluster
from devstack.provider import MEMBER_ENTITLEMENT, PROXY_AUDIENCE, OidcProvider
from devstack.proxy import ProxyServer
from tests.integration.conftest import ProxyFactory, call, job_body, proxy_config, records_for
from tests.integration.hostile import Canary, RestdLog, diag_delta, http_bytes, raw_request

# --------------------------------------------------------------------------- client identity headers

SPELLINGS = [
    "X-SLURM-USER-NAME",
    "x-slurm-user-name",
    "X-Slurm-User-Name",
    "X_SLURM_USER_NAME",
    "x_slurm_user_name",
    "X-Slurm-User_Name",
    "X_SLURM-USER_NAME",
    "X-SLURM-USER-TOKEN",
    "x-slurm-user-token",
    "X_SLURM_USER_TOKEN",
    "x_Slurm_User-Token",
    "X-SLURM-USER-NAME\r\nX-SLURM-USER-NAME",  # the same header twice
]


@pytest.fixture(scope="module")
def root_token(slurm: SlurmCluster) -> str:
    """A real Slurm token for root: if any copy of it reached slurmrestd, the RPC would run as root."""
    return slurm.mint_token("root", lifespan=3600)


def _forged_headers(spelling: str, root_token: str) -> list[tuple[str, str]]:
    names = spelling.split("\r\n")
    value = "root" if "NAME" in spelling.upper() else root_token
    headers = [(name, value) for name in names]
    # Slurm needs the pair: give each forged one its partner so a leak could take effect.
    if "NAME" in spelling.upper():
        headers.append(("X-SLURM-USER-TOKEN", root_token))
    else:
        headers.append(("X-SLURM-USER-NAME", "root"))
    return headers


@pytest.mark.parametrize("spelling", SPELLINGS, ids=[s.replace("\r\n", "+") for s in SPELLINGS])
def test_client_slurm_identity_headers_never_reach_slurm(
    proxy: ProxyServer,
    slurm: SlurmCluster,
    oidc: OidcProvider,
    api: str,
    request_id: str,
    root_token: str,
    spelling: str,
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    restd = RestdLog(slurm)
    headers = [("Authorization", f"Bearer {token}"), ("X-Request-ID", request_id)]
    headers += _forged_headers(spelling, root_token)
    before = slurm.diag()
    mark = restd.mark()
    answer = raw_request(proxy, http_bytes("GET", f"{api}/jobs", headers))
    delta = diag_delta(before, slurm.diag())
    assert answer.status == 200, answer.body[:300]
    assert [p.rstrip("/") for _, p in restd.since(mark)] == [f"{api}/jobs"]
    # slurmctld's side: the job listing ran as alice; root made only our own sdiag call.
    assert delta.get("user:alice", 0) >= 1 and delta.get("user:root", 0) <= 1, delta
    assert records_for(proxy, request_id)[0]["local_user"] == "alice"


def test_a_job_with_every_forged_header_at_once_runs_as_the_mapped_user(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str, request_id: str, root_token: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    headers = [("Authorization", f"Bearer {token}"), ("X-Request-ID", request_id), ("Content-Type", "application/json")]
    for spelling in SPELLINGS:
        headers += _forged_headers(spelling, root_token)
    body = json.dumps(job_body(api, slurm.job_dir("alice"))).encode()
    answer = raw_request(proxy, http_bytes("POST", f"{api}/job/submit", headers, body))
    assert answer.status == 200, answer.body[:300]
    job = slurm.wait_job(answer.json()["job_id"])
    assert job["UserId"] == "alice(2001)" and job["JobState"] == "COMPLETED"


# --------------------------------------------------------------------------- CR/LF and broken HTTP

INJECTIONS = [
    pytest.param(b"X-Note: a\rX-SLURM-USER-NAME: root", id="bare-cr"),
    pytest.param(b"X-Note: a\nX-SLURM-USER-NAME: root", id="bare-lf"),
    pytest.param(b"X-Note: a\r\n X-SLURM-USER-NAME: root", id="obs-fold"),
    pytest.param(b"X-Note: a\r\n\tX-SLURM-USER-NAME: root", id="obs-fold-tab"),
    pytest.param(b"X-Note: a\x00X-SLURM-USER-NAME: root", id="nul"),
    pytest.param(b"X-SLURM-USER-NAME : root", id="space-before-colon"),
    pytest.param(b"X-Note\r\nX-SLURM-USER-NAME: root", id="header-without-colon"),
    pytest.param(b"Content-Length: 5\r\nTransfer-Encoding: chunked", id="cl-and-te"),
    pytest.param(b"Transfer-Encoding: chunked, identity", id="te-not-chunked-last"),
]


@pytest.mark.parametrize("injected", INJECTIONS)
def test_crlf_and_malformed_headers_are_refused_as_json(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str, request_id: str, injected: bytes
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    restd = RestdLog(slurm)
    mark = restd.mark()
    jobs_before = {j["JobId"] for j in slurm.jobs()}
    body = json.dumps(job_body(api, slurm.job_dir("alice"))).encode()
    head = http_bytes("POST", f"{api}/job/submit", [("Authorization", f"Bearer {token}"), ("X-Request-ID", request_id)])
    data = head.replace(b"\r\n\r\n", b"\r\n" + injected + b"\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    answer = raw_request(proxy, data)
    assert answer.status == 400, answer.body[:300]
    assert answer.reason == "bad_http" and answer.headers["content-type"] == "application/json"
    assert restd.since(mark) == []
    assert {j["JobId"] for j in slurm.jobs()} == jobs_before
    records = [r for r in proxy.audit_records() if r["request_id"] == answer.json()["slurmproxy"]["request_id"]]
    assert [(r["status"], r["reason"]) for r in records] == [(400, "bad_http")]


@pytest.mark.parametrize(
    "path",
    [
        "/slurm/{v}/jobs%0d%0aX-SLURM-USER-NAME:%20root",
        "/slurm/{v}/jobs%0aX",
        "/slurm/{v}/jobs%0d",
        "/slurm/{v}/jobs?x=\r\nX-SLURM-USER-NAME: root",
    ],
)
def test_encoded_crlf_in_the_target_is_refused(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str, request_id: str, path: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    restd = RestdLog(slurm)
    mark = restd.mark()
    target = path.format(v=api.rsplit("/", 1)[1]).replace("\\r\\n", "\r\n")
    headers = [("Authorization", f"Bearer {token}"), ("X-Request-ID", request_id)]
    answer = raw_request(proxy, http_bytes("GET", target, headers))
    assert answer.status == 400 and answer.reason in {"bad_path", "bad_query", "bad_http"}
    assert restd.since(mark) == []


# --------------------------------------------------------------------------- paths and methods


@pytest.fixture(scope="module")
def narrow(slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory) -> ProxyServer:
    """alice may ping and read one job by id; nothing else."""
    policy = {
        "rules": [
            {
                "id": "narrow",
                "entitlements": [MEMBER_ENTITLEMENT],
                "allow": ["ping", {"methods": ["GET"], "path": "/slurm/{version}/job/{job_id}"}],
                "mapping": [{"table": "users"}],
            }
        ],
        "tables": {"users": {"entries": [{"issuer": oidc.issuer, "subject": "alice", "user": "alice"}]}},
    }
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    return proxy_factory(proxy_config(slurm, [issuer]), {"narrow.yaml": policy})


@pytest.fixture(scope="module")
def alice(oidc: OidcProvider) -> str:
    return oidc.client_credentials_token("alice-cli")


PATH_TRICKS = [
    "/slurm/{v}/ping/../jobs",
    "/slurm/{v}/ping/../../{v}/jobs",
    "/slurm/{v}/ping/%2e%2e/jobs",
    "/slurm/{v}/ping/%2E%2E/jobs",
    "/slurm/{v}/ping/.%2e/jobs",
    "/slurm/{v}/ping/%2e./jobs",
    "/slurm/{v}/ping/%2e%2e%2fjobs",
    "/slurm/{v}/ping%2F..%2Fjobs",
    "/slurm/{v}/ping%2f..%2fjobs",
    "/slurm%2F{v}%2Fjobs",
    "/slurm/{v}/ping/%252e%252e/jobs",
    "/slurm/{v}/ping/%c0%ae%c0%ae/jobs",
    "/slurm/{v}/ping/%u002e%u002e/jobs",
    "//slurm/{v}/jobs",
    "/slurm//{v}/jobs",
    "/slurm/{v}//jobs",
    "/slurm/{v}/ping//../jobs",
    "/slurm/{v}/ping;/../jobs",
    "/slurm/{v}/ping/..;/jobs",
    "/slurm/{v}/jobs;ping",
    "/slurm/{v}/ping;jsessionid=1",
    "/slurm/{v}/jobs.",
    "/slurm/{v}/ping.",
    "/slurm/{v}./jobs",
    "/slurm/{v}/jobs..",
    "/slurm/{v}/./jobs",
    "/./slurm/{v}/jobs",
    "/slurm/{v}/ping/./",
    "/slurm/{v}/ping\\..\\jobs",
    "/slurm/{v}/ping%5C..%5Cjobs",
    "/slurm/{v}/jobs%00",
    "/slurm/{v}/jobs%00/ping",
    "/slurm/{v}/jobs%20",
    "/slurm/{v}/jobs%09",
    "/SLURM/{v}/JOBS",
    "/Slurm/{v}/Ping",
    "/slurm/{V}/ping",
    "/slurm/{v}/PING",
    "/slurm/{v}/diag",
    "/slurm/{v}/jobs",
    "/slurm/{v}/reconfigure",
    "/slurm/{v}/reconfigure/",
    "/slurm/{v}/job/submit",
    "/slurm/{v}/job/1/../../jobs",
    "/slurm/{v}/job/1%2F..%2F..%2Fjobs",
    "/slurm/{v}/job/-1",
    "/slurm/{v}/job/1;rm",
    "/slurmdb/{v}/jobs",
    "/openapi/v3",
    "/slurm/{v}/ping/x/..",
    "/slurm/v0.0.38/../{v}/jobs",
    "/slurm/{v}/jobs\xe2\x81\x84",
    "/" + "a/" * 1500,
    "*",
    "slurm/{v}/jobs",
]


def _target(template: str, api: str) -> bytes:
    version = api.rsplit("/", 1)[1]
    return template.replace("{v}", version).replace("{V}", version.upper()).encode("latin-1")


@pytest.mark.parametrize("template", PATH_TRICKS)
def test_path_tricks_never_reach_an_endpoint_the_policy_does_not_allow(
    narrow: ProxyServer, slurm: SlurmCluster, alice: str, api: str, request_id: str, template: str
) -> None:
    restd = RestdLog(slurm)
    mark = restd.mark()
    before = slurm.diag()
    data = http_bytes("GET", "TARGET", [("Authorization", f"Bearer {alice}"), ("X-Request-ID", request_id)])
    answer = raw_request(narrow, data.replace(b"TARGET", _target(template, api)))
    assert answer.status in {400, 403, 404}, (answer.status, answer.body[:300])
    assert answer.reason in {"bad_path", "bad_http", "operation_not_allowed", "not_found"}, answer.body[:300]
    assert restd.since(mark) == []
    delta = diag_delta(before, slurm.diag())
    assert "user:alice" not in delta and "REQUEST_JOB_INFO" not in delta, delta
    records = [r for r in narrow.audit_records() if r["request_id"] == answer.json()["slurmproxy"]["request_id"]]
    assert len(records) == 1 and records[0]["decision"] == "deny" and records[0]["upstream_status"] is None


@pytest.mark.parametrize(
    "template",
    [
        "/slurm/{v}/ping",
        "/slurm/{v}/ping/",
        "/slurm/{v}/p%69ng",
        "/slurm/{v}/ping?x=/../jobs",
        "/slurm/{v}/ping#/../jobs",
    ],
)
def test_path_controls_reach_exactly_the_allowed_endpoint(
    narrow: ProxyServer, slurm: SlurmCluster, alice: str, api: str, request_id: str, template: str
) -> None:
    """The same harness lets allowed paths through: a refusal above is the policy's, not the harness's."""
    restd = RestdLog(slurm)
    mark = restd.mark()
    data = http_bytes("GET", "TARGET", [("Authorization", f"Bearer {alice}"), ("X-Request-ID", request_id)])
    answer = raw_request(narrow, data.replace(b"TARGET", _target(template, api)))
    assert answer.reason is None, answer.body[:300]  # slurmrestd's answer (it refuses unknown query parameters)
    assert answer.status == 200 or b"?" in _target(template, api), answer.body[:300]
    assert [(m, p.split("?")[0].rstrip("/")) for m, p in restd.since(mark)] == [("GET", f"{api}/ping")]


METHODS = ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "MOVE", "FOO", "get", "Get"]


@pytest.mark.parametrize("method", METHODS)
def test_methods_the_policy_does_not_allow_never_reach_slurmrestd(
    narrow: ProxyServer, slurm: SlurmCluster, alice: str, api: str, request_id: str, method: str
) -> None:
    restd = RestdLog(slurm)
    mark = restd.mark()
    headers = [("Authorization", f"Bearer {alice}"), ("X-Request-ID", request_id)]
    answer = raw_request(narrow, http_bytes(method, f"{api}/ping", headers, b"{}" if method == "POST" else b""))
    assert answer.status in {400, 403}, (answer.status, answer.body[:300])
    assert restd.since(mark) == []


def test_connect_is_refused(narrow: ProxyServer, slurm: SlurmCluster, alice: str, request_id: str) -> None:
    restd = RestdLog(slurm)
    mark = restd.mark()
    headers = [("Authorization", f"Bearer {alice}"), ("X-Request-ID", request_id)]
    answer = raw_request(narrow, http_bytes("CONNECT", f"127.0.0.1:{slurm.restd_port}", headers))
    assert answer.status == 400
    assert restd.since(mark) == []


@pytest.fixture
def running_job(proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str) -> Iterator[int]:
    token = oidc.client_credentials_token("alice-cli")
    body = job_body(api, slurm.job_dir("alice"), script="#!/bin/bash\nsleep 600\n")
    response = call(proxy, "POST", f"{api}/job/submit", token=token, json=body)
    job_id = int(response.json()["job_id"])
    slurm.wait_job(job_id, states=("RUNNING", "PENDING"))
    yield job_id
    slurm.slurm_cmd(["scancel", str(job_id)], check=False)


def test_method_override_headers_do_not_turn_a_read_into_a_cancel(
    narrow: ProxyServer, slurm: SlurmCluster, alice: str, api: str, request_id: str, running_job: int
) -> None:
    restd = RestdLog(slurm)
    mark = restd.mark()
    overrides = [("X-HTTP-Method-Override", "DELETE"), ("X-HTTP-Method", "DELETE"), ("X-Method-Override", "DELETE")]
    headers = [("Authorization", f"Bearer {alice}"), ("X-Request-ID", request_id), *overrides]
    answer = raw_request(narrow, http_bytes("GET", f"{api}/job/{running_job}?_method=DELETE", headers))
    assert answer.status == 200, answer.body[:300]
    assert [m for m, _ in restd.since(mark)] == ["GET"]
    assert slurm.job(running_job)["JobState"] in {"RUNNING", "PENDING"}


def test_absolute_form_targets_and_host_headers_never_choose_the_upstream(
    narrow: ProxyServer, slurm: SlurmCluster, alice: str, api: str, request_id: str
) -> None:
    with Canary() as canary:
        restd = RestdLog(slurm)
        mark = restd.mark()
        headers = [("Authorization", f"Bearer {alice}"), ("X-Request-ID", request_id)]
        absolute = raw_request(narrow, http_bytes("GET", f"{canary.url}{api}/ping", headers))
        host = raw_request(
            narrow,
            http_bytes("GET", f"{api}/ping", headers).replace(
                b"Host: proxy", f"Host: 127.0.0.1:{canary.port}".encode()
            ),
        )
        forwarded = raw_request(narrow, http_bytes("GET", f"{api}/ping", [*headers, ("X-Forwarded-Host", canary.url)]))
        assert canary.connections == 0
    assert (absolute.status, host.status, forwarded.status) == (200, 200, 200)
    assert [p.rstrip("/") for _, p in restd.since(mark)] == [f"{api}/ping"] * 3


# --------------------------------------------------------------------------- bodies (proxy-independent)


def _submit_raw(
    proxy: ProxyServer, token: str, api: str, request_id: str, body: bytes, extra: list[tuple[str, str]]
) -> tuple[int, Any]:
    headers = [("Authorization", f"Bearer {token}"), ("X-Request-ID", request_id), *extra]
    answer = raw_request(proxy, http_bytes("POST", f"{api}/job/submit", headers, body))
    return answer.status, answer


def test_a_body_over_max_body_bytes_is_413_before_anything_is_forwarded(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str, request_id: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    restd = RestdLog(slurm)
    mark = restd.mark()
    jobs_before = {j["JobId"] for j in slurm.jobs()}
    huge = json.dumps({**job_body(api, slurm.job_dir("alice")), "padding": "x" * (2 * 1024 * 1024)}).encode()
    json_type = {"Content-Type": "application/json"}
    declared = call(
        proxy, "POST", f"{api}/job/submit", token=token, request_id=f"{request_id}-cl", content=huge, headers=json_type
    )

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(huge), 65536):
            yield huge[start : start + 65536]

    chunked = call(
        proxy,
        "POST",
        f"{api}/job/submit",
        token=token,
        request_id=f"{request_id}-te",
        content=chunks(),
        headers=json_type,
    )
    for response, rid in [(declared, f"{request_id}-cl"), (chunked, f"{request_id}-te")]:
        assert response.status_code == 413, response.text[:300]
        assert response.json()["slurmproxy"]["reason"] == "body_too_large"
        assert [r["reason"] for r in records_for(proxy, rid)] == ["body_too_large"]
    assert restd.since(mark) == []
    assert {j["JobId"] for j in slurm.jobs()} == jobs_before


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        pytest.param(b"[" * 200_000 + b"]" * 200_000, "application/json", "bad_json", id="deeply-nested-array"),
        pytest.param(
            b'{"job":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001, "application/json", "bad_json", id="nested-object"
        ),
        pytest.param(b'{"script": "#!/bin/bash\\nid", "job": {', "application/json", "bad_json", id="truncated-json"),
        pytest.param(b"\xff\xfe{\x00}\x00", "application/json", "bad_json", id="not-utf8"),
        pytest.param(b"script=id", "application/x-www-form-urlencoded", "unsupported_media_type", id="form-body"),
        pytest.param(b'{"script": "x"}', "text/plain", "unsupported_media_type", id="text-plain"),
    ],
)
def test_hostile_bodies_are_refused_by_the_proxy_and_slurmrestd_survives(
    proxy: ProxyServer,
    slurm: SlurmCluster,
    oidc: OidcProvider,
    api: str,
    request_id: str,
    body: bytes,
    content_type: str,
    reason: str,
) -> None:
    """The proxy's job-body checks refuse these before anything is forwarded (a JSON parser's
    RecursionError included): one record, no job, and slurmrestd still answers."""
    token = oidc.client_credentials_token("alice-cli")
    restd = RestdLog(slurm)
    mark = restd.mark()
    jobs_before = {j["JobId"] for j in slurm.jobs()}
    status, answer = _submit_raw(proxy, token, api, request_id, body, [("Content-Type", content_type)])
    assert 400 <= status < 500 and answer.reason == reason, (status, answer.body[:300])
    assert [r["reason"] for r in records_for(proxy, request_id)] == [reason]
    assert restd.since(mark) == []
    assert {j["JobId"] for j in slurm.jobs()} == jobs_before
    ping = call(proxy, "GET", f"{api}/ping", token=token)
    assert ping.status_code == 200


def test_a_client_that_vanishes_mid_body_is_recorded(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str, request_id: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    jobs_before = {j["JobId"] for j in slurm.jobs()}
    headers = [("Authorization", f"Bearer {token}"), ("X-Request-ID", request_id), ("Content-Length", "5000")]
    import socket

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(http_bytes("POST", f"{api}/job/submit", headers) + b'{"script": "#!/bin/bash\\nid", ')
    wait = httpx.Client(timeout=30)
    for _ in range(100):
        if records_for(proxy, request_id):
            break
        wait.get(proxy.url + "/_slurmproxy/live")
    (record,) = records_for(proxy, request_id)
    assert record["status"] >= 400 and record["decision"] in {"deny", "error"}
    assert {j["JobId"] for j in slurm.jobs()} == jobs_before


@pytest.mark.parametrize("shape", ["job", "jobs"])
@pytest.mark.parametrize("group_id", ["alice", 2001], ids=["name", "number"])
def test_a_group_id_never_reaches_slurmrestd(
    proxy: ProxyServer,
    slurm: SlurmCluster,
    oidc: OidcProvider,
    api: str,
    request_id: str,
    shape: str,
    group_id: str | int,
) -> None:
    """Found by the schemathesis run: slurmrestd 24.11 (data_parser v0.0.41 and v0.0.42) exits with
    ``fatal: invalid type`` on a submit whose ``group_id`` is a string, in ``job`` or in any element
    of ``jobs``: anyone allowed to submit could take slurmrestd down. The proxy's job-body checks
    refuse ``group_id`` in both shapes before anything is forwarded; slurmrestd keeps answering."""
    restd = RestdLog(slurm)
    mark = restd.mark()
    token = oidc.client_credentials_token("alice-cli")
    job = job_body(api, slurm.job_dir("alice"))
    body: dict[str, Any] = {"script": job["script"], "job": {**job["job"], "group_id": group_id}}
    if shape == "jobs":
        body = {"script": job["script"], "jobs": [{**job["job"], "group_id": group_id}]}
    try:
        status, answer = _submit_raw(
            proxy, token, api, request_id, json.dumps(body).encode(), [("Content-Type", "application/json")]
        )
        alive = call(proxy, "GET", f"{api}/ping", token=token).status_code == 200
    finally:
        slurm.start_slurmrestd()  # a no-op while it runs
    assert 400 <= status < 500 and answer.json()["errors"][0]["source"] == "slurmproxy", answer.body[:300]
    assert alive, "slurmrestd went down"
    assert [p for _, p in restd.since(mark) if p.endswith("/job/submit")] == []
