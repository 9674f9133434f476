"""The devstack's Slurm clusters, driven through slurmrestd directly (no proxy involved)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from devstack import SlurmCluster
from devstack.users import ALICE, BOB

pytestmark = pytest.mark.integration


def hs256_token(cluster: SlurmCluster, user: str, lifespan: int = 300) -> str:
    """A Slurm JWT minted by hand with the cluster's key, as the proxy will do."""
    key = OctKey.import_key(cluster.jwt_key_path.read_bytes())
    now = int(time.time())
    return jwt.encode({"alg": "HS256", "typ": "JWT"}, {"iat": now, "exp": now + lifespan, "sun": user}, key)


def headers(user: str, token: str) -> dict[str, str]:
    return {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": token}


@pytest.fixture(scope="module")
def cluster2205(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with SlurmCluster(tmp_path_factory.mktemp("slurm2205"), "22.05") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def cluster2411(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with SlurmCluster(tmp_path_factory.mktemp("slurm2411"), "24.11") as cluster:
        yield cluster


def test_2205_cluster_shape(cluster2205: SlurmCluster) -> None:
    assert cluster2205.api_versions == ["v0.0.38"]
    assert cluster2205.url.startswith("http://127.0.0.1:")
    key = cluster2205.jwt_key_path
    assert len(key.read_bytes()) == 32
    assert key.stat().st_mode & 0o777 == 0o600
    sinfo = cluster2205.slurm_cmd(["sinfo", "-h", "-o", "%P %l %T"]).stdout.split("\n")
    assert "debug* infinite idle" in sinfo
    assert "long 1-00:00:00 idle" in sinfo


def test_2205_submit_as_alice_runs_as_alice(cluster2205: SlurmCluster) -> None:
    out_dir = cluster2205.job_dir("alice")
    token = hs256_token(cluster2205, "alice")
    body = {
        "script": "#!/bin/bash\nid\n",
        "job": {
            "name": "devstack-2205",
            "current_working_directory": str(out_dir),
            "standard_output": str(out_dir / "out-%j.txt"),
            "environment": {"PATH": "/bin:/usr/bin"},
            "partition": "debug",
        },
    }
    with httpx.Client(base_url=cluster2205.url, timeout=30) as client:
        resp = client.post("/slurm/v0.0.38/job/submit", json=body, headers=headers("alice", token))
        assert resp.status_code == 200, resp.text
        job_id = resp.json()["job_id"]
        job = cluster2205.wait_job(job_id, timeout=60)
        assert job["JobState"] == "COMPLETED", job
        assert job["UserId"] == f"alice({ALICE.uid})"
        output = (out_dir / f"out-{job_id}.txt").read_text()
        assert output.startswith(f"uid={ALICE.uid}(alice)")
        # Slurm's own view through REST with the same token.
        info = client.get(f"/slurm/v0.0.38/job/{job_id}", headers=headers("alice", token))
        assert info.status_code == 200
        assert info.json()["jobs"][0]["user_name"] == "alice"


def test_2205_bad_tokens(cluster2205: SlurmCluster) -> None:
    alice = hs256_token(cluster2205, "alice")
    with httpx.Client(base_url=cluster2205.url, timeout=30) as client:
        ping = "/slurm/v0.0.38/ping"
        assert client.get(ping, headers=headers("alice", alice)).status_code == 200
        # slurmrestd 22.05 answers authentication failures detected by slurmctld with 500.
        assert client.get(ping, headers=headers("bob", alice)).status_code == 500
        assert client.get(ping, headers=headers("alice", "garbage")).status_code == 500
        expired = hs256_token(cluster2205, "alice", lifespan=-10)
        assert client.get(ping, headers=headers("alice", expired)).status_code == 500
        # No auth headers at all: rest_auth/jwt refuses before any RPC.
        assert client.get(ping).status_code == 401
        # SlurmUser's token may impersonate anyone.
        slurm = cluster2205.mint_token("slurm", 300)
        assert client.get(ping, headers=headers(BOB.name, slurm)).status_code == 200


def test_2205_unix_socket(cluster2205: SlurmCluster) -> None:
    sock = cluster2205.unix_socket
    assert sock is not None and sock.exists()
    token = hs256_token(cluster2205, "bob")
    transport = httpx.HTTPTransport(uds=str(sock))
    with httpx.Client(transport=transport, base_url="http://slurmrestd", timeout=30) as client:
        resp = client.get("/slurm/v0.0.38/ping", headers=headers("bob", token))
        assert resp.status_code == 200, resp.text


def test_2205_helpers(cluster2205: SlurmCluster) -> None:
    cluster2205.reset_diag()
    token = hs256_token(cluster2205, "bob")
    with httpx.Client(base_url=cluster2205.url, timeout=30) as client:
        client.get("/slurm/v0.0.38/ping", headers=headers("bob", token))
    diag = cluster2205.diag()
    assert diag.get("REQUEST_PING", 0) >= 1
    assert diag.get("user:bob", 0) >= 1
    assert isinstance(cluster2205.jobs(), list)


def test_2205_fault_controls(cluster2205: SlurmCluster) -> None:
    token = hs256_token(cluster2205, "alice")
    ping = cluster2205.url + "/slurm/v0.0.38/ping"
    cluster2205.kill_slurmrestd()
    with pytest.raises(httpx.ConnectError):
        httpx.get(ping, headers=headers("alice", token), timeout=5)
    cluster2205.start_slurmrestd()
    assert httpx.get(ping, headers=headers("alice", token), timeout=30).status_code == 200
    cluster2205.stop_slurmctld()
    down = httpx.get(ping, headers=headers("alice", token), timeout=60)
    assert down.status_code >= 500
    cluster2205.start_slurmctld()
    assert httpx.get(ping, headers=headers("alice", token), timeout=30).status_code == 200


def test_two_clusters_side_by_side(tmp_path: Path, cluster2205: SlurmCluster) -> None:
    with SlurmCluster(tmp_path, "22.05", unix_socket=False) as other:
        assert other.name != cluster2205.name
        assert other.restd_port != cluster2205.restd_port
        token = hs256_token(other, "alice")
        assert httpx.get(other.url + "/slurm/v0.0.38/ping", headers=headers("alice", token)).status_code == 200
        # The other cluster's key is different: its tokens mean nothing here.
        wrong = httpx.get(cluster2205.url + "/slurm/v0.0.38/ping", headers=headers("alice", token), timeout=30)
        assert wrong.status_code == 500
    assert other.unix_socket is None


def _submit_2411(cluster: SlurmCluster, user: str, version: str) -> dict[str, Any]:
    out_dir = cluster.job_dir(user)
    token = hs256_token(cluster, user)
    body = {
        "script": "#!/bin/bash\nid\n",
        "job": {
            "name": f"devstack-{version}",
            "current_working_directory": str(out_dir),
            "standard_output": str(out_dir / "out-%j.txt"),
            "environment": ["PATH=/bin:/usr/bin"],
            "partition": "debug",
        },
    }
    resp = httpx.post(f"{cluster.url}/slurm/{version}/job/submit", json=body, headers=headers(user, token), timeout=30)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def test_2411_submit_as_alice_runs_as_alice(cluster2411: SlurmCluster) -> None:
    assert "v0.0.42" in cluster2411.api_versions
    data = _submit_2411(cluster2411, "alice", "v0.0.42")
    job_id = data["job_id"]
    job = cluster2411.wait_job(job_id, timeout=60)
    assert job["JobState"] == "COMPLETED", job
    output = (cluster2411.job_dir("alice") / f"out-{job_id}.txt").read_text()
    assert output.startswith(f"uid={ALICE.uid}(alice)")


def test_2411_all_served_versions_submit(cluster2411: SlurmCluster) -> None:
    job_ids = [_submit_2411(cluster2411, "bob", version)["job_id"] for version in cluster2411.api_versions]
    for job_id in job_ids:
        assert cluster2411.wait_job(job_id, timeout=60)["JobState"] == "COMPLETED"
        output = (cluster2411.job_dir("bob") / f"out-{job_id}.txt").read_text()
        assert output.startswith(f"uid={BOB.uid}(bob)")


def test_2411_bad_tokens_and_authorization_header(cluster2411: SlurmCluster) -> None:
    alice = hs256_token(cluster2411, "alice")
    jobs = "/slurm/v0.0.42/jobs"
    with httpx.Client(base_url=cluster2411.url, timeout=30) as client:
        assert client.get(jobs, headers=headers("alice", alice)).status_code == 200
        # 24.11 maps authentication failures detected by slurmctld to 511.
        assert client.get(jobs, headers=headers("bob", alice)).status_code == 511
        assert client.get(jobs, headers=headers("alice", "garbage")).status_code == 511
        assert client.get(jobs).status_code == 401
        # Bearer alone is accepted as a Slurm token; next to the X-SLURM headers it is ambiguous.
        assert client.get(jobs, headers={"Authorization": f"Bearer {alice}"}).status_code == 200
        both = {"Authorization": f"Bearer {alice}", **headers("alice", alice)}
        assert client.get(jobs, headers=both).status_code == 401
    sock = cluster2411.unix_socket
    assert sock is not None
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://slurmrestd") as client:
        assert client.get(jobs, headers=headers("alice", alice)).status_code == 200


@pytest.fixture(scope="module")
def cluster2605(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with SlurmCluster(tmp_path_factory.mktemp("slurm2605"), "26.05") as cluster:
        yield cluster


def test_2605_submit_as_alice_runs_as_alice(cluster2605: SlurmCluster) -> None:
    assert cluster2605.api_versions == ["v0.0.42", "v0.0.43", "v0.0.44", "v0.0.45"]
    assert cluster2605.slurmdb_versions == []
    version = cluster2605.slurm_cmd(["scontrol", "--version"]).stdout
    assert version.startswith("slurm-wlm 26.05."), version  # Debian names it slurm-wlm
    job_id = _submit_2411(cluster2605, "alice", "v0.0.45")["job_id"]
    job = cluster2605.wait_job(job_id, timeout=60)
    assert job["JobState"] == "COMPLETED", job
    assert job["UserId"] == f"alice({ALICE.uid})"
    output = (cluster2605.job_dir("alice") / f"out-{job_id}.txt").read_text()
    assert output.startswith(f"uid={ALICE.uid}(alice)")


def test_2605_auth_headers_as_in_2411(cluster2605: SlurmCluster) -> None:
    alice = hs256_token(cluster2605, "alice")
    jobs = "/slurm/v0.0.45/jobs/"
    with httpx.Client(base_url=cluster2605.url, timeout=30) as client:
        assert client.get(jobs, headers=headers("alice", alice)).status_code == 200
        rejected = client.get(jobs, headers=headers("bob", alice))
        assert rejected.status_code == 511
        assert rejected.json()["errors"][0]["error_number"] == 1007
        assert client.get(jobs, headers=headers("alice", "garbage")).status_code == 511
        assert client.get(jobs).status_code == 401
        assert client.get(jobs, headers={"X-SLURM-USER-TOKEN": alice}).status_code == 200
        assert client.get(jobs, headers={"Authorization": f"Bearer {alice}"}).status_code == 200
        both = {"Authorization": f"Bearer {alice}", **headers("alice", alice)}
        assert client.get(jobs, headers=both).status_code == 401
        # A refused submission is 422 from 26.05 on (24.11: 500).
        bad = {
            "script": "#!/bin/bash\n",
            "job": {"partition": "nope", "environment": ["A=1"], "current_working_directory": "/"},
        }
        refused = client.post("/slurm/v0.0.45/job/submit", json=bad, headers=headers("alice", alice))
        assert refused.status_code == 422
        assert refused.json()["errors"][0]["error_number"] == 2000
