"""Requests derived from each version's real OpenAPI document, served by the running slurmrestd.

Every (method, path) in the document is classified independently of the proxy's code (the table
below: what the example policy, policies/site.yaml, lets vo.example.org members do) and then sent
through the proxy as alice. Allowed operations must reach slurmrestd and get its real answer;
everything else must be refused with 403 without reaching slurmrestd (its own request log and
slurmctld's RPC counters say so). Request bodies are checked against the document's schemas.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devstack import SlurmCluster
from devstack.provider import OidcProvider
from devstack.proxy import ProxyServer
from slurmproxy.core.slurmrest import takes_body
from tests.integration.conftest import call, job_body, records_for

METHODS = ("get", "post", "put", "patch", "delete")
# What policies/site.yaml allows members (ping, read-only, openapi, submit, update-own, cancel-own),
# written out by hand from the README's table; the key is (method, path with {version}, no trailing /).
ALLOWED: dict[tuple[str, str], str] = {
    ("GET", "/slurm/{version}/ping"): "ping",
    **{
        ("GET", f"/slurm/{{version}}/{p}"): "read-only"
        for p in [
            "diag",
            "jobs",
            "jobs/state",
            "job/{job_id}",
            "nodes",
            "node/{node_name}",
            "partitions",
            "partition/{partition_name}",
            "reservations",
            "reservation/{reservation_name}",
            "licenses",
            "shares",
        ]
    },
    **{("GET", p): "openapi" for p in ["/openapi", "/openapi.json", "/openapi.yaml", "/openapi/v3"]},
    ("POST", "/slurm/{version}/job/submit"): "submit",
    ("POST", "/slurm/{version}/job/{job_id}"): "update-own",
    ("DELETE", "/slurm/{version}/job/{job_id}"): "cancel-own",
}
RESERVATION = f"it-rsv-{uuid.uuid4().hex[:6]}"
_VERSION = re.compile(r"/v0\.0\.[0-9]+(?=/|$)")


def operations(document: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m.upper(), path) for path, item in document["paths"].items() for m in METHODS if m in item]


def template(path: str) -> str:
    return _VERSION.sub("/{version}", path, count=1).rstrip("/") or "/"


def version_of(path: str) -> str | None:
    match = _VERSION.search(path)
    return match.group(0)[1:] if match else None


def schema(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = document["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def request_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return schema(document, body)


def submit_body(document: dict[str, Any], path: str, version: str, slurm: SlurmCluster) -> dict[str, Any]:
    """job_body() for this version, checked against the document: known fields, the environment's shape."""
    body = job_body(version, slurm.job_dir("alice"), script="#!/bin/bash\nsleep 300\n", name=f"derived-{version}")
    job_schema = schema(document, request_schema(document, path)["properties"]["job"])["properties"]
    assert set(body["job"]) <= set(job_schema), set(body["job"]) - set(job_schema)
    environment = schema(document, job_schema["environment"])["type"]
    assert isinstance(body["job"]["environment"], dict if environment == "object" else list), environment
    # Ten minutes, so the job fits before the test's reservation: an integer in v0.0.38, a
    # {set, infinite, number} object from v0.0.40 on.
    limit = schema(document, job_schema["time_limit"])
    if limit.get("type") == "integer":
        body["job"]["time_limit"] = 10
    else:
        assert set(limit["properties"]) == {"set", "infinite", "number"}, limit
        body["job"]["time_limit"] = {"set": True, "infinite": False, "number": 10}
    return body


def update_body(document: dict[str, Any], path: str) -> dict[str, Any]:
    assert "comment" in schema(document, request_schema(document, path))["properties"]
    return {"comment": "derived-update"}


@pytest.fixture
def reservation(slurm: SlurmCluster) -> Iterator[str]:
    """A real reservation far in the future (so no job waits for it) for GET reservation/{name}."""
    slurm.slurm_cmd(
        ["scontrol", "create", "reservation", f"ReservationName={RESERVATION}", "StartTime=now+300days"]
        + ["Duration=10", "Nodes=localhost", "Users=alice", "Flags=IGNORE_JOBS"]
    )
    yield RESERVATION
    slurm.slurm_cmd(["scontrol", "delete", f"ReservationName={RESERVATION}"], check=False)


def fill(path: str, values: dict[str, str]) -> str:
    return re.sub(r"\{([a-z_]+)\}", lambda m: values.get(m.group(1), "x1"), path)


def test_every_operation_in_the_served_openapi_documents(
    proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, reservation: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    rid = f"derived-{uuid.uuid4().hex[:10]}"
    fetched = call(proxy, "GET", "/openapi/v3", token=token, request_id=rid)
    assert fetched.status_code == 200, fetched.text
    assert records_for(proxy, rid)[0]["operation"] == "openapi"
    document = fetched.json()
    ops = operations(document)
    assert {version_of(p) for _, p in ops} - {None} == set(slurm.api_versions)

    allowed = [(m, p) for m, p in ops if (m, template(p)) in ALLOWED]
    # Denied: what the document offers beyond the policy (24.11: reconfigure, allocate, node updates,
    # bulk job deletion), and every method the document does not declare for its paths.
    undeclared = [(m.upper(), p) for p in document["paths"] for m in METHODS if (m.upper(), p) not in ops]
    denied = [(m, p) for m, p in ops + undeclared if (m, template(p)) not in ALLOWED]
    for served in slurm.api_versions:  # the document offers every group the policy grants, in every version
        groups = {ALLOWED[(m, template(p))] for m, p in allowed if version_of(p) == served}
        assert groups == {"ping", "read-only", "submit", "update-own", "cancel-own"}, (served, groups)
    # 22.05 lists its /openapi paths in the document, 24.11 does not.
    assert all(ALLOWED[(m, p)] == "openapi" for m, p in allowed if version_of(p) is None)

    # Submissions first (they give the job ids), cancellations last.
    order = {"submit": 0, "cancel-own": 2}
    allowed.sort(key=lambda op: order.get(ALLOWED[(op[0], template(op[1]))], 1))
    job_ids: dict[str, str] = {}
    restd_log = slurm.log_dir / "slurmrestd.log"
    log_before, sent = restd_log.read_text(), []
    for method, path in allowed:
        group = ALLOWED[(method, template(path))]
        version = version_of(path)
        values = {"node_name": "localhost", "partition_name": "debug", "reservation_name": reservation}
        values["job_id"] = job_ids.get(version or "", "")
        body = None
        if group == "submit":
            assert version is not None
            body = submit_body(document, path, version, slurm)
        elif group == "update-own":
            body = update_body(document, path)
        rid = f"derived-{uuid.uuid4().hex[:10]}"
        response = call(proxy, method, fill(path, values), token=token, request_id=rid, json=body)
        sent.append(f"{method} {fill(path, values)}")
        assert response.status_code == 200, (method, path, response.text[:500])
        (record,) = records_for(proxy, rid)
        assert record["decision"] == "allow" and record["operation"] == group, (method, path, record)
        assert record["upstream_status"] == 200 and record["local_user"] == "alice"
        answer = response.json()
        if group != "openapi":
            assert answer["meta"]["plugin"]["type"].startswith("openapi/"), (path, answer["meta"])
            assert not answer.get("errors"), (method, path, answer["errors"])
        if group == "submit":
            assert version is not None
            job_ids[version] = str(answer["job_id"])
            assert slurm.job(answer["job_id"])["UserId"] == "alice(2001)"
        elif group == "update-own":
            assert slurm.job(values["job_id"])["Comment"] == "derived-update"
        elif group == "cancel-own":
            assert slurm.wait_job(values["job_id"])["JobState"] == "CANCELLED"
        elif "{reservation_name}" in path:
            assert [r["name"] for r in answer["reservations"]] == [reservation]
    assert set(job_ids) == set(slurm.api_versions)
    # slurmrestd logs every request it routes: the witness used below for the denied ones.
    new_log = restd_log.read_text()[len(log_before) :]
    assert [line for line in sent if line not in new_log] == []

    log_before, rpcs_before = restd_log.read_text(), slurm.diag().get("user:alice", 0)
    values = {"job_id": "1", "node_name": "localhost", "partition_name": "debug", "reservation_name": reservation}
    for method, path in denied:
        rid = f"derived-{uuid.uuid4().hex[:10]}"
        # A body only where slurmrestd takes one: elsewhere it is refused (400) before the policy is asked.
        body = {} if takes_body(method, fill(path, values)) else None
        response = call(proxy, method, fill(path, values), token=token, request_id=rid, json=body)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["slurmproxy"]["reason"] == "operation_not_allowed", (method, path)
        (record,) = records_for(proxy, rid)
        assert record["decision"] == "deny" and record["upstream_status"] is None
    new_log = restd_log.read_text()[len(log_before) :]
    reached = [f"{m} {fill(p, values)}" for m, p in denied if f"{m} {fill(p, values)}" in new_log]
    assert reached == []
    assert slurm.diag().get("user:alice", 0) == rpcs_before
