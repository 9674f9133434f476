"""slurmdbd accounting on a private MariaDB: associations, enforcement, and /slurmdb through slurmrestd."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import OctKey

from devstack import SlurmCluster
from devstack.users import ALICE

pytestmark = pytest.mark.integration

GENERATIONS = ["22.05", "24.11", "26.05"]
REFUSED_STATUS = {"22.05": 500, "24.11": 500, "26.05": 422}
"""HTTP status of a submission slurmctld refuses (here: error 2045, an account the user may not use)."""


def token(cluster: SlurmCluster, user: str) -> str:
    key = OctKey.import_key(cluster.jwt_key_path.read_bytes())
    now = int(time.time())
    return jwt.encode({"alg": "HS256", "typ": "JWT"}, {"iat": now, "exp": now + 300, "sun": user}, key)


@pytest.fixture(scope="module", params=GENERATIONS, ids=[f"slurm-{g}" for g in GENERATIONS])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    accounts = {"vo-example": ["alice", "carol"], "vo-other": ["bob"]}
    workdir = tmp_path_factory.mktemp(f"acct-{request.param}")
    with SlurmCluster(workdir, request.param, accounting=True, accounts=accounts, min_job_age=2) as cluster:
        yield cluster


def submit(cluster: SlurmCluster, user: str, account: str | None = None) -> httpx.Response:
    version = cluster.api_versions[-1]
    directory = cluster.job_dir(user)
    job: dict[str, Any] = {
        "name": "acct",
        "current_working_directory": str(directory),
        "standard_output": str(directory / "out-%j.txt"),
        "environment": {"PATH": "/bin:/usr/bin"} if version == "v0.0.38" else ["PATH=/bin:/usr/bin"],
    }
    if account:
        job["account"] = account
    headers = {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": token(cluster, user)}
    return httpx.post(
        f"{cluster.url}/slurm/{version}/job/submit",
        json={"script": "#!/bin/bash\nid\n", "job": job},
        headers=headers,
        timeout=30,
    )


def error_number(response: httpx.Response) -> int:
    first = response.json()["errors"][0]
    return int(first.get("error_number", first.get("error_code", 0)))


def test_associations_from_constructor_and_methods(cluster: SlurmCluster) -> None:
    rows = {(a["account"], a["user"]): a for a in cluster.associations()}
    assert rows[("vo-example", "alice")]["default"] == "vo-example"
    assert rows[("vo-other", "bob")]["default"] == "vo-other"
    assert ("vo-other", "alice") not in rows
    cluster.add_account("vo-third")
    cluster.add_user("dave", "vo-third")
    assert ("vo-third", "dave") in {(a["account"], a["user"]) for a in cluster.associations()}
    accepted = submit(cluster, "dave")
    assert accepted.status_code == 200, accepted.text
    cluster.wait_job(accepted.json()["job_id"])  # sacctmgr refuses to remove associations with active jobs
    cluster.remove_user("dave")
    assert ("vo-third", "dave") not in {(a["account"], a["user"]) for a in cluster.associations()}
    assert submit(cluster, "dave").status_code == REFUSED_STATUS[cluster.generation]


def test_enforcement_refuses_an_account_the_user_is_not_associated_with(cluster: SlurmCluster) -> None:
    refused = submit(cluster, "alice", account="vo-other")
    assert refused.status_code == REFUSED_STATUS[cluster.generation], refused.text
    assert error_number(refused) == 2045  # ESLURM_INVALID_ACCOUNT
    assert submit(cluster, "alice", account="no-such-account").status_code == REFUSED_STATUS[cluster.generation]
    accepted = submit(cluster, "alice")
    assert accepted.status_code == 200, accepted.text
    job = cluster.wait_job(accepted.json()["job_id"])
    assert job["JobState"] == "COMPLETED"
    assert job["Account"] == "vo-example"
    assert job["UserId"] == f"alice({ALICE.uid})"


def test_slurmdb_serves_jobs_slurmctld_has_forgotten(cluster: SlurmCluster) -> None:
    assert cluster.slurmdb_versions, "slurmrestd lists no /slurmdb paths in /openapi/v3"
    accepted = submit(cluster, "carol")
    assert accepted.status_code == 200, accepted.text
    job_id = accepted.json()["job_id"]
    cluster.wait_job(job_id)
    cluster.wait_job_gone(job_id)
    version = cluster.slurmdb_versions[-1]
    headers = {"X-SLURM-USER-NAME": "carol", "X-SLURM-USER-TOKEN": token(cluster, "carol")}
    response = httpx.get(f"{cluster.url}/slurmdb/{version}/job/{job_id}", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    [job] = response.json()["jobs"]
    assert (job["job_id"], job["user"], job["account"]) == (job_id, "carol", "vo-example")
    listed = httpx.get(f"{cluster.url}/slurmdb/{version}/jobs", headers=headers, timeout=30).json()["jobs"]
    assert job_id in {j["job_id"] for j in listed}
