from __future__ import annotations

import pytest

from slurmproxy.core.slurmrest import (
    JobRequest,
    compile_path,
    credential_probe_path,
    dialect_of,
    is_reserved,
    job_id_in_path,
    job_request,
    requested_api,
    version_key,
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/slurm/v0.0.42/jobs", ("slurm", "v0.0.42"), id="slurm"),
        pytest.param("/slurmdb/v0.0.38/jobs", ("slurmdb", "v0.0.38"), id="slurmdb"),
        pytest.param("/slurm/v0.0.40/", ("slurm", "v0.0.40"), id="trailing-slash"),
        pytest.param("/slurm/v0.0.40", ("slurm", "v0.0.40"), id="bare"),
        pytest.param("/openapi/v3", None, id="openapi"),
        pytest.param("/slurm/latest/jobs", None, id="not-a-version"),
        pytest.param("/", None, id="root"),
    ],
)
def test_requested_api(path: str, expected: tuple[str, str] | None) -> None:
    assert requested_api(path) == expected


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/slurm/{version}/jobs", "/slurm/v0.0.38/jobs", True),
        ("/slurm/{version}/jobs", "/slurm/v0.0.38/jobs/", True),
        ("/slurm/{version}/jobs", "/slurm/v0.0.42/jobs", True),
        ("/slurm/{version}/jobs", "/slurm/v0.0.99/jobs", False),
        ("/slurm/{version}/jobs", "/slurm/v0.0.38/jobs/state", False),
        ("/slurm/{version}/jobs", "/slurm/v0.0.38/jobsx", False),
        ("/slurm/{version}/job/{job_id}", "/slurm/v0.0.38/job/12", True),
        ("/slurm/{version}/job/{job_id}", "/slurm/v0.0.38/job/12_3", True),
        ("/slurm/{version}/job/{job_id}", "/slurm/v0.0.38/job/submit", False),
        ("/slurm/{version}/job/{job_id}", "/slurm/v0.0.38/job/12/../submit", False),
        ("/slurm/{version}/node/{name}", "/slurm/v0.0.40/node/cn-01.cluster", True),
    ],
)
def test_path_patterns(pattern: str, path: str, matches: bool) -> None:
    assert (compile_path(pattern).fullmatch(path) is not None) is matches


@pytest.mark.parametrize(
    ("pattern", "message"),
    [("slurm/x", "must start with"), ("/slurm/{nope}", "unknown placeholder"), ("/slurm/.*", "characters outside")],
)
def test_bad_path_patterns(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compile_path(pattern)


@pytest.mark.parametrize(
    ("version", "dialect"),
    [
        pytest.param("v0.0.36", "legacy", id="36"),
        pytest.param("v0.0.38", "legacy", id="38"),
        pytest.param("v0.0.39", "data_parser", id="39"),
        pytest.param("v0.0.40", "data_parser", id="40"),
        pytest.param("v0.0.43", "data_parser", id="43"),
    ],
)
def test_dialect_of(version: str, dialect: str) -> None:
    assert dialect_of(version) == dialect


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        pytest.param("POST", "/slurm/v0.0.38/job/submit", JobRequest("submit", "v0.0.38"), id="submit-38"),
        pytest.param("POST", "/slurm/v0.0.42/job/submit/", JobRequest("submit", "v0.0.42"), id="trailing-slash"),
        pytest.param("POST", "/slurm/v0.0.42/job/allocate", JobRequest("allocate", "v0.0.42"), id="allocate"),
        pytest.param("POST", "/slurm/v0.0.40/job/123", JobRequest("update", "v0.0.40"), id="update"),
        pytest.param("POST", "/slurm/v0.0.43/job/12_3", JobRequest("update", "v0.0.43"), id="update-array-task"),
        pytest.param("GET", "/slurm/v0.0.42/job/123", None, id="get"),
        pytest.param("DELETE", "/slurm/v0.0.42/job/123", None, id="delete"),
        pytest.param("POST", "/slurmdb/v0.0.42/job/123", None, id="slurmdb"),
        pytest.param("POST", "/slurm/v0.0.42/node/n1", None, id="node-update"),
    ],
)
def test_job_requests(method: str, path: str, expected: JobRequest | None) -> None:
    assert job_request(method, path) == expected


def test_versions_order_by_number_not_text() -> None:
    versions = ["v0.0.40", "v0.0.9", "v0.0.100", "v0.0.38"]
    assert sorted(versions, key=version_key) == ["v0.0.9", "v0.0.38", "v0.0.40", "v0.0.100"]
    assert version_key("latest") == (-1,)


@pytest.mark.parametrize(
    ("path", "job"),
    [
        pytest.param("/slurm/v0.0.42/job/4711", 4711, id="job"),
        pytest.param("/slurm/v0.0.42/job/4711_3/", 4711, id="array-task"),
        pytest.param("/slurmdb/v0.0.42/job/9", 9, id="accounting"),
        pytest.param("/slurm/v0.0.42/job/submit", None, id="submit"),
        pytest.param("/slurm/v0.0.42/jobs", None, id="listing"),
    ],
)
def test_job_id_in_path(path: str, job: int | None) -> None:
    assert job_id_in_path(path) == job


@pytest.mark.parametrize(
    ("path", "reserved"),
    [
        pytest.param("/", True, id="root"),
        pytest.param("/slurm/x", True, id="slurm"),
        pytest.param("/slurmdb", True, id="slurmdb"),
        pytest.param("/openapi.json", True, id="openapi"),
        pytest.param("/_slurmproxy/metrics", True, id="own"),
        pytest.param("/metrics", False, id="metrics"),
        pytest.param("/slurmish", False, id="prefix-only"),
    ],
)
def test_reserved_paths(path: str, reserved: bool) -> None:
    assert is_reserved(path) is reserved


def test_the_credential_probe_cancels_a_job_that_never_exists() -> None:
    assert credential_probe_path("v0.0.38") == "/slurm/v0.0.38/job/0"
    assert job_request("DELETE", credential_probe_path("v0.0.38")) is None
