"""Issue 9: the proxy against both Slurm generations, every API version each one serves.

22.05 serves v0.0.38; 24.11 serves v0.0.40, v0.0.41 and v0.0.42 from one slurmrestd; 26.05 serves
v0.0.42 to v0.0.45. Each test runs on every generation (the ``slurm`` fixture) and loops over every
version the cluster serves.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import SlurmCluster
from devstack.provider import PROXY_AUDIENCE, OidcProvider
from devstack.proxy import ProxyServer
from tests.integration.conftest import (
    ProxyFactory,
    call,
    job_body,
    ping_up,
    proxy_config,
    records_for,
    site_policy,
)

NOT_SERVED = {
    "22.05": ["v0.0.37", "v0.0.40", "v0.0.42"],
    "24.11": ["v0.0.38", "v0.0.39", "v0.0.43"],
    "26.05": ["v0.0.40", "v0.0.41", "v0.0.46"],
}
REFUSED_SUBMIT_STATUS = {"22.05": 500, "24.11": 500, "26.05": 422}
"""What slurmrestd answers a submission slurmctld refuses (a bad partition): 26.05 says 422."""


def the_record(proxy: ProxyServer, request_id: str) -> dict[str, Any]:
    records = records_for(proxy, request_id)
    assert len(records) == 1, records
    return records[0]


def generation(slurm: SlurmCluster) -> str:
    return slurm.generation


def wait_for(predicate: Any, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_every_served_version_submits_lists_updates_and_cancels_as_the_mapped_user(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, request_id: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    out_dir = slurm.job_dir("alice")
    for version in slurm.api_versions:
        api = f"/slurm/{version}"
        rid = f"{request_id}-{version}"
        body = job_body(version, out_dir, script="#!/bin/bash\nid\nsleep 300\n", name=f"gen-{version}")
        submitted = call(proxy, "POST", f"{api}/job/submit", token=token, request_id=f"{rid}-submit", json=body)
        assert submitted.status_code == 200, (version, submitted.text)
        job_id = submitted.json()["job_id"]
        assert the_record(proxy, f"{rid}-submit")["job_id"] == job_id

        job = slurm.wait_job(job_id, states=("RUNNING",))
        assert job["UserId"] == "alice(2001)", version
        output = out_dir / f"out-{job_id}.txt"
        wait_for(lambda output=output: output.exists() and output.read_text(), what=f"{output}")
        assert output.read_text().startswith("uid=2001(alice)"), version

        listing = call(proxy, "GET", f"{api}/jobs", token=token)
        assert listing.status_code == 200, (version, listing.text)
        assert job_id in [j["job_id"] for j in listing.json()["jobs"]], version

        update = call(proxy, "POST", f"{api}/job/{job_id}", token=token, json={"comment": f"via-{version}"})
        assert update.status_code == 200, (version, update.text)
        assert slurm.job(job_id)["Comment"] == f"via-{version}"

        cancel = call(proxy, "DELETE", f"{api}/job/{job_id}", token=token, request_id=f"{rid}-cancel")
        assert cancel.status_code == 200, (version, cancel.text)
        assert slurm.wait_job(job_id)["JobState"] == "CANCELLED", version
        record = the_record(proxy, f"{rid}-cancel")
        assert record["operation"] == "cancel-own" and record["local_user"] == "alice"


def test_readiness_lists_the_served_versions_and_other_versions_get_404(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, request_id: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    ready = call(proxy, "GET", "/_slurmproxy/ready", token=token)  # the details: for callers the policy admits
    assert ready.status_code == 200, ready.text
    reported = ready.json()["checks"]["api_versions"]
    assert reported["versions"] == {"slurm": slurm.api_versions} and reported["error"] is None

    restd_log = slurm.log_dir / "slurmrestd.log"
    before = restd_log.read_text()
    for version in NOT_SERVED[generation(slurm)]:
        rid = f"{request_id}-{version}"
        response = call(proxy, "GET", f"/slurm/{version}/jobs", token=token, request_id=rid)
        assert response.status_code == 404, response.text
        body = response.json()
        assert body["slurmproxy"]["reason"] == "api_version_not_served"
        assert body["slurmproxy"]["api_versions"] == {"slurm": slurm.api_versions}
        assert body["errors"][0]["error"].endswith(f"it serves /slurm/ {', '.join(slurm.api_versions)}")
        record = the_record(proxy, rid)
        assert record["decision"] == "deny" and record["upstream_status"] is None
    new_lines = restd_log.read_text()[len(before) :]
    assert not [v for v in NOT_SERVED[generation(slurm)] if f"/slurm/{v}/" in new_lines]


def test_versions_are_learned_when_slurmrestd_comes_up_after_the_proxy(
    slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    slurm.stop_slurmrestd()
    try:
        late = proxy_factory(
            proxy_config(slurm, [{"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}]),
            {"site.yaml": site_policy(oidc.issuer)},
        )

        def failed_once() -> bool:
            ready = call(late, "GET", "/_slurmproxy/ready", token=token)
            return ready.json()["checks"]["api_versions"]["error"] is not None

        wait_for(failed_once, timeout=30, what="the proxy's first attempt to read the versions")
        ready = call(late, "GET", "/_slurmproxy/ready", token=token)
        assert ready.status_code == 503 and ready.json()["checks"]["api_versions"]["versions"] is None
    finally:
        slurm.start_slurmrestd()

    def learned() -> bool:
        versions = call(late, "GET", "/_slurmproxy/ready", token=token).json()["checks"]["api_versions"]["versions"]
        return bool(versions == {"slurm": slurm.api_versions})

    wait_for(learned, timeout=30, what="the proxy to read slurmrestd's versions")


def test_no_client_authorization_header_reaches_slurmrestd(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider
) -> None:
    slurm_token = slurm.mint_token("alice", lifespan=300)
    witness_headers = {"X-SLURM-USER-NAME": "alice", "X-SLURM-USER-TOKEN": slurm_token, "Authorization": "Bearer x"}
    witness = httpx.get(f"{slurm.url}/slurm/{slurm.api_versions[-1]}/jobs", headers=witness_headers, timeout=30)
    if generation(slurm) != "22.05":
        # 24.11 and 26.05 refuse a request carrying Authorization next to the X-SLURM headers: a 200
        # through the proxy proves the client's Authorization header never got there.
        assert witness.status_code == 401, witness.text
    else:
        assert witness.status_code == 200  # 22.05 ignores the header: it cannot witness its absence

    token = oidc.client_credentials_token("alice-cli")
    for version in slurm.api_versions:
        for method, path, body in [
            ("GET", f"/slurm/{version}/jobs", None),
            ("POST", f"/slurm/{version}/job/submit", job_body(version, slurm.job_dir("alice"), script="#!/bin/sh\n")),
        ]:
            response = call(proxy, method, path, token=token, json=body, headers={"X-SLURM-USER-TOKEN": slurm_token})
            assert response.status_code == 200, (version, method, response.text)


def test_job_errors_pass_through_unchanged(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, request_id: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    for version in slurm.api_versions:
        body = job_body(version, slurm.job_dir("alice"), partition="no-such-partition")
        rid = f"{request_id}-{version}"
        bad = call(proxy, "POST", f"/slurm/{version}/job/submit", token=token, request_id=rid, json=body)
        assert bad.status_code == REFUSED_SUBMIT_STATUS[generation(slurm)], (version, bad.text)
        errors = bad.json()["errors"]
        assert errors[0].get("error_number", errors[0].get("error_code")) == 2000, errors
        assert errors[0]["error"] == "Invalid partition name specified"
        record = the_record(proxy, rid)
        assert record["decision"] == "allow" and record["status"] == record["upstream_status"] == bad.status_code

        missing = call(proxy, "GET", f"/slurm/{version}/job/4000000", token=token)
        assert missing.status_code == (500 if version == "v0.0.38" else 404), (version, missing.text)
        assert missing.json()["errors"][0]["error_number"] == 2017


@pytest.fixture(scope="module")
def wrong_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wrong-key") / "jwt_hs256.key"
    path.write_bytes(os.urandom(32))
    return path


@pytest.fixture
def wrong_key_proxy(
    slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory, wrong_key: Path
) -> Iterator[ProxyServer]:
    config = proxy_config(
        slurm, [{"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}], upstream={"jwt_key_file": str(wrong_key)}
    )
    server = proxy_factory(config, {"site.yaml": site_policy(oidc.issuer)})
    yield server
    server.stop()


def test_a_rejected_proxy_credential_is_502_upstream_auth_failed(
    wrong_key_proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, request_id: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    expected_upstream = 500 if generation(slurm) == "22.05" else 511
    for version in slurm.api_versions:
        body = job_body(version, slurm.job_dir("alice"))
        for method, path, payload in [
            ("GET", f"/slurm/{version}/jobs", None),
            ("POST", f"/slurm/{version}/job/submit", body),
            ("POST", f"/slurm/{version}/job/1", {"comment": "x"}),
            ("DELETE", f"/slurm/{version}/job/1", None),
        ]:
            rid = f"{request_id}-{version}-{method}-{path.rsplit('/', 1)[1]}"
            response = call(wrong_key_proxy, method, path, token=token, request_id=rid, json=payload)
            assert response.status_code == 502, (version, method, response.text)
            assert response.json()["slurmproxy"]["reason"] == "upstream_auth_failed"
            assert response.json()["errors"][0]["source"] == "slurmproxy"
            record = the_record(wrong_key_proxy, rid)
            assert record["decision"] == "error" and record["reason"] == "upstream_auth_failed"
            assert record["upstream_status"] == expected_upstream and record["local_user"] == "alice"
    ping = call(wrong_key_proxy, "GET", f"/slurm/{slurm.api_versions[-1]}/ping", token=token)
    if generation(slurm) == "22.05":
        assert ping.status_code == 502 and ping.json()["slurmproxy"]["reason"] == "upstream_auth_failed"
    else:  # 24.11's and 26.05's ping do not check the credential: slurmctld just looks down
        assert ping.status_code == 200 and not ping_up(ping.json()), ping.text
    assert "X-SLURM-USER-TOKEN" not in wrong_key_proxy.audit_path.read_text()
    assert "eyJ" not in wrong_key_proxy.audit_path.read_text() + wrong_key_proxy.log_path.read_text()
    assert "rejected the proxy's Slurm credential" in wrong_key_proxy.log_path.read_text()
    ready = call(wrong_key_proxy, "GET", "/_slurmproxy/ready", token=token)
    credential = ready.json()["checks"]["upstream_credential"]
    assert credential["rejections"] >= 4 * len(slurm.api_versions)
    assert credential["last"]["status"] == expected_upstream


def test_service_token_mode_works_and_an_expired_token_is_502(
    slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    token_file = tmp_path / "slurm.token"
    token_file.write_text(f"SLURM_JWT={slurm.mint_token(slurm.slurm_user, lifespan=600)}\n")
    upstream = {"auth": "service_token", "service_token_file": str(token_file), "jwt_key_file": None}
    config = proxy_config(slurm, [{"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}], upstream=upstream)
    server = proxy_factory(config, {"site.yaml": site_policy(oidc.issuer)})
    token = oidc.client_credentials_token("alice-cli")
    try:
        for version in slurm.api_versions:
            body = job_body(version, slurm.job_dir("alice"))
            submitted = call(server, "POST", f"/slurm/{version}/job/submit", token=token, json=body)
            assert submitted.status_code == 200, (version, submitted.text)
            assert slurm.wait_job(submitted.json()["job_id"])["UserId"] == "alice(2001)"

        expired = slurm.mint_token(slurm.slurm_user, lifespan=1)
        token_file.write_text(f"SLURM_JWT={expired}\n")
        time.sleep(2.5)  # the token expires; the proxy re-reads the changed file (every 5 s at most)

        def rejected() -> bool:
            response = call(server, "GET", f"/slurm/{slurm.api_versions[-1]}/jobs", token=token)
            return response.status_code == 502

        wait_for(rejected, timeout=30, what="the expired service token to be used")
        response = call(server, "GET", f"/slurm/{slurm.api_versions[-1]}/jobs", token=token)
        assert response.json()["slurmproxy"]["reason"] == "upstream_auth_failed"
        assert expired not in response.text and expired not in json.dumps(server.audit_records())
    finally:
        server.stop()
