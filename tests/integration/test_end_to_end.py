"""Issue 2, end to end: a federated token in, a job running as the mapped Unix user out.

Real slurmctld/slurmd/slurmrestd 22.05, the real OpenID provider, the proxy as a real server.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from devstack import SlurmCluster
from devstack.provider import PROXY_AUDIENCE, OidcProvider, default_config
from devstack.proxy import ProxyServer
from tests.integration.conftest import ProxyFactory, call, job_body, ping_up, proxy_config, records_for, site_policy


def submit(proxy: ProxyServer, slurm: SlurmCluster, api: str, token: str, request_id: str, **kw: Any) -> int:
    body = job_body(api, slurm.job_dir(kw.pop("user", "alice")), **kw)
    response = call(proxy, "POST", f"{api}/job/submit", token=token, request_id=request_id, json=body)
    assert response.status_code == 200, response.text
    job_id = response.json()["job_id"]
    assert isinstance(job_id, int)
    return job_id


def the_record(proxy: ProxyServer, request_id: str) -> dict[str, Any]:
    records = records_for(proxy, request_id)
    assert len(records) == 1, records
    return records[0]


def test_member_job_runs_as_the_mapped_user(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str, request_id: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    job_id = submit(proxy, slurm, api, token, request_id)

    job = slurm.wait_job(job_id)
    assert job["JobState"] == "COMPLETED"
    assert job["UserId"] == "alice(2001)"
    output = (slurm.job_dir("alice") / f"out-{job_id}.txt").read_text()
    assert output.startswith("uid=2001(alice)")

    view = call(proxy, "GET", f"{api}/job/{job_id}", token=token)
    assert view.status_code == 200
    assert view.json()["jobs"][0]["user_name"] == "alice"

    record = the_record(proxy, request_id)
    assert record["decision"] == "allow" and record["status"] == 200 and record["upstream_status"] == 200
    assert record["issuer"] == oidc.issuer and record["subject"] == "alice"
    assert record["local_user"] == "alice" and record["mapping"] == "table:users"
    assert record["rule"] == "example-members" and record["operation"] == "submit"
    assert record["method"] == "POST" and record["path"] == f"{api}/job/submit"
    assert record["job_id"] == job_id
    assert token not in json.dumps(proxy.audit_records())


def test_member_lists_and_cancels_their_job(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str, request_id: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    job_id = submit(proxy, slurm, api, token, f"{request_id}-submit", script="#!/bin/bash\nsleep 300\n")
    slurm.wait_job(job_id, states=("RUNNING", "PENDING"))

    listing = call(proxy, "GET", f"{api}/jobs", token=token, request_id=f"{request_id}-list")
    assert listing.status_code == 200
    assert job_id in [j["job_id"] for j in listing.json()["jobs"]]

    cancel = call(proxy, "DELETE", f"{api}/job/{job_id}", token=token, request_id=f"{request_id}-delete")
    assert cancel.status_code == 200, cancel.text
    assert slurm.wait_job(job_id)["JobState"] == "CANCELLED"
    for rid, operation in [(f"{request_id}-list", "read-only"), (f"{request_id}-delete", "cancel-own")]:
        record = the_record(proxy, rid)
        assert record["operation"] == operation and record["local_user"] == "alice"


def test_token_without_the_entitlement_is_403_and_nothing_reaches_slurm(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str, request_id: str
) -> None:
    before = {j["JobId"] for j in slurm.jobs()}
    token = oidc.client_credentials_token("dave-cli")
    body = job_body(api, slurm.job_dir("dave"))
    response = call(proxy, "POST", f"{api}/job/submit", token=token, request_id=request_id, json=body)
    assert response.status_code == 403
    body = response.json()
    assert body["slurmproxy"]["reason"] == "no_rule_matches"
    assert f"no rule allows POST {api}/job/submit" in body["errors"][0]["error"]
    assert {j["JobId"] for j in slurm.jobs()} == before
    record = the_record(proxy, request_id)
    assert record["decision"] == "deny" and record["status"] == 403 and record["subject"] == "dave"
    assert record["upstream_status"] is None and record["local_user"] is None


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    config = default_config()
    config["access_token_ttl"] = 1
    with OidcProvider(tmp_path_factory.mktemp("oidc-short"), config) as provider:
        yield provider


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    with OidcProvider(tmp_path_factory.mktemp("oidc-stranger"), default_config()) as provider:
        yield provider


@pytest.fixture(scope="module")
def two_issuer_proxy(
    slurm: SlurmCluster, oidc: OidcProvider, short_lived: OidcProvider, proxy_factory: ProxyFactory
) -> ProxyServer:
    issuers: list[dict[str, Any]] = [
        {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]},
        {"issuer": short_lived.issuer, "audiences": [PROXY_AUDIENCE], "leeway_seconds": 0},
    ]
    # With two issuers, the rules name whose tokens they admit (issue 15, item 2).
    policy = {**site_policy(oidc.issuer), "issuers": [oidc.issuer, short_lived.issuer]}
    return proxy_factory(proxy_config(slurm, issuers), {"site.yaml": policy})


def _tamper(token: str) -> str:
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "root"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


def test_each_bad_token_is_401_with_the_failed_check(
    two_issuer_proxy: ProxyServer, oidc: OidcProvider, short_lived: OidcProvider, stranger: OidcProvider, api: str
) -> None:
    expired = short_lived.client_credentials_token("alice-cli")
    stranger.reset_stats()
    cases = {
        "missing_token": None,
        "malformed_token": "this-is-not-a-jwt",
        "untrusted_issuer": stranger.client_credentials_token("alice-cli"),
        "wrong_audience": oidc.login("alice"),  # Check-in-shaped: no aud
        "bad_signature": _tamper(oidc.client_credentials_token("alice-cli")),
    }
    time.sleep(2.2)
    cases["token_expired"] = expired
    for reason, token in cases.items():
        rid = f"it-401-{reason}-{api[-2:]}"
        response = call(two_issuer_proxy, "GET", f"{api}/jobs", token=token, request_id=rid)
        assert response.status_code == 401, (reason, response.text)
        assert response.json()["slurmproxy"]["reason"] == reason
        assert response.headers["www-authenticate"].startswith("Bearer")
        if token is not None:
            assert 'error="invalid_token"' in response.headers["www-authenticate"]
            assert token not in response.text
        record = the_record(two_issuer_proxy, rid)
        assert record["decision"] == "deny" and record["reason"] == reason and record["status"] == 401
    assert sum(stranger.stats().values()) == 1  # only our token request: the proxy never called it


@pytest.mark.parametrize(
    "header", ["X-SLURM-USER-NAME", "x-slurm-user-name", "X_SLURM_USER_NAME", "X-Slurm-User_Name", "x_SLURM-user-NAME"]
)
def test_client_user_name_header_cannot_change_the_user(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str, request_id: str, header: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    body = job_body(api, slurm.job_dir("alice"))
    headers = {header: "root", "X-SLURM-USER-TOKEN": "forged.token.value", "Authorization_": "Bearer x"}
    response = call(proxy, "POST", f"{api}/job/submit", token=token, request_id=request_id, json=body, headers=headers)
    assert response.status_code == 200, response.text
    job = slurm.wait_job(response.json()["job_id"])
    assert job["UserId"] == "alice(2001)"
    assert the_record(proxy, request_id)["local_user"] == "alice"


def test_slurmrestd_outage_is_502_and_recovers_without_restart(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str, request_id: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    assert call(proxy, "GET", f"{api}/ping", token=token).status_code == 200
    slurm.stop_slurmrestd()
    try:
        down = call(proxy, "GET", f"{api}/ping", token=token, request_id=f"{request_id}-down")
        assert down.status_code == 502
        assert down.json()["errors"][0]["source"] == "slurmproxy"
        assert down.json()["slurmproxy"]["reason"] == "upstream_unreachable"
        record = the_record(proxy, f"{request_id}-down")
        assert record["decision"] == "error" and record["status"] == 502 and record["local_user"] == "alice"
    finally:
        slurm.start_slurmrestd()
    up = call(proxy, "GET", f"{api}/ping", token=token, request_id=f"{request_id}-up")
    assert up.status_code == 200, up.text
    assert ping_up(up.json())
    assert the_record(proxy, f"{request_id}-up")["status"] == 200


def test_readiness_reports_keys_and_upstream(proxy: ProxyServer, oidc: OidcProvider) -> None:
    ready = call(proxy, "GET", "/_slurmproxy/ready", token=oidc.client_credentials_token("alice-cli"))
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["issuers"] == {oidc.issuer: "keys loaded"}
    anonymous = call(proxy, "GET", "/_slurmproxy/ready")  # issue 15, item 9: the status only
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready"}
    outsider = call(proxy, "GET", "/_slurmproxy/ready", token=oidc.client_credentials_token("dave-cli"))
    assert outsider.json() == {"status": "ready"}  # a valid token, but no rule admits dave
