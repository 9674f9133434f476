"""Clients generated from the running slurmrestd's own OpenAPI document drive the proxy, unchanged.

For each generation, openapi-python-client (PyPI; pinned in constraints.txt) generates a Python
client from ``GET /openapi/v3`` of the cluster under test into a temporary directory, at test
time (about 4 s each; nothing is committed). The generated code is imported as it is. For every
API version the cluster serves, it pings, submits, gets, lists, updates and cancels a job through
the proxy, with an OAuth token (the generated ``AuthenticatedClient``) and with forged
``X-SLURM-USER-NAME``/``X-SLURM-USER-TOKEN`` headers of its own, which the proxy strips: the job
runs as the mapped account, never as the forged one.

Slurm 24.11's document has boolean properties with the default ``0`` (v0.0.40's no-value numbers),
which makes the generator drop the job description and everything using it; those defaults, and
only those, are corrected to ``false`` before generating (:func:`repair_defaults`).

The functions are found the way a user of the client finds them, by the document's operation ids
(the generator's own ``snake_case``), and request bodies are built with the generated models'
``from_dict``, so the client's own serialisation is what reaches the proxy.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from openapi_python_client.strings import snake_case

from devstack import SlurmCluster
from devstack.jobschema import openapi_document
from devstack.provider import OidcProvider
from devstack.proxy import ProxyServer
from tests.integration.conftest import job_body

FORGED = {"X-SLURM-USER-NAME": "root", "X-SLURM-USER-TOKEN": "forged-by-the-client"}
GENERATOR = Path(sys.executable).with_name("openapi-python-client")


class Generated:
    """One generated client package and the document it came from."""

    def __init__(self, package: ModuleType, document: dict[str, Any]) -> None:
        self.package = package
        self.document = document

    def operation(self, method: str, path: str) -> ModuleType:
        """The generated module for an operation: ``api.<tag>.<snake_case(operationId)>``."""
        paths = self.document["paths"]
        spec = next(paths[p] for p in (path.rstrip("/"), path.rstrip("/") + "/") if p in paths)  # 24.11+: "/"
        operation = spec[method.lower()]
        tag = snake_case(operation.get("tags", ["default"])[0])
        return importlib.import_module(f"{self.package.__name__}.api.{tag}.{snake_case(operation['operationId'])}")

    def client(self, base_url: str, token: str) -> Any:
        authenticated = importlib.import_module(f"{self.package.__name__}.client").AuthenticatedClient
        return authenticated(base_url=base_url, token=token, headers=dict(FORGED), timeout=60.0)


@dataclass
class Answer:
    status: int
    parsed: Any
    unparsable: str | None  # why the generated models could not read slurmrestd's answer
    text: str = ""


def send(module: ModuleType, client: Any, *args: Any, **kwargs: Any) -> Answer:
    """What ``module.sync_detailed`` does (the module's own request builder, then its own parser),
    in two steps, so that an answer slurmrestd gives against its own schema is still seen: v0.0.41
    and later answer a job update with ``"results": null`` where the schema says a list, and the
    generated parser raises on it."""
    raw = client.get_httpx_client().request(**module._get_kwargs(*args, **kwargs))
    try:
        return Answer(raw.status_code, module._build_response(client=client, response=raw).parsed, None, raw.text)
    except (TypeError, KeyError, ValueError, AttributeError) as error:
        return Answer(raw.status_code, None, f"{type(error).__name__}: {error}", raw.text)


def body_model(module: ModuleType) -> Any:
    """The generated model class a function takes as ``body`` (its annotation is ``Model | Unset``)."""
    hint = typing.get_type_hints(module.sync_detailed)["body"]
    return next(t for t in typing.get_args(hint) or (hint,) if hasattr(t, "from_dict"))


def repair_defaults(node: Any, where: str = "") -> list[str]:
    """Correct what makes the generator drop schemas: a boolean with a non-boolean default.

    24.11's document gives ``infinite`` in v0.0.40's no-value numbers ``"default": 0`` (and v0.0.38's
    ``oversubscribe`` ``"default": "false"``); openapi-python-client then refuses those schemas and
    every schema that uses them, the job description included. Only such defaults are changed (to
    the boolean they mean); the list of changes is returned so the test can say what it changed.
    """
    changed: list[str] = []
    if isinstance(node, dict):
        if node.get("type") == "boolean" and "default" in node and not isinstance(node["default"], bool):
            node["default"] = node["default"] not in (0, "0", "false", "False", False)
            changed.append(where)
        for key, value in node.items():
            changed += repair_defaults(value, f"{where}/{key}")
    elif isinstance(node, list):
        for n, value in enumerate(node):
            changed += repair_defaults(value, f"{where}/{n}")
    return changed


@pytest.fixture(scope="module")
def generated(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Generated:
    document = openapi_document(slurm)
    repaired = repair_defaults(document)
    assert all("/properties/" in where for where in repaired), repaired
    name = f"slurm_client_{slurm.generation.replace('.', '')}"
    workdir = tmp_path_factory.mktemp(f"client-{slurm.generation}")
    (workdir / "openapi.json").write_text(json.dumps(document))
    (workdir / "config.yaml").write_text(
        f"project_name_override: {name}\npackage_name_override: {name}\npost_hooks: []\n"
    )
    argv = [str(GENERATOR), "generate", "--path", "openapi.json", "--config", "config.yaml", "--meta", "none"]
    done = subprocess.run([*argv, "--output-path", name], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and (workdir / name / "client.py").exists(), done.stdout[-3000:] + done.stderr[-3000:]
    sys.path.insert(0, str(workdir))
    return Generated(importlib.import_module(name), document)


def test_generated_clients_ping_submit_get_list_update_and_cancel_through_the_proxy(
    generated: Generated, proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider
) -> None:
    unparsable = []
    with generated.client(proxy.url, oidc.client_credentials_token("alice-cli")) as client:
        for version in slurm.api_versions:
            unparsable += drive(generated, client, slurm, version)
    print(f"\ngenerated client, Slurm {slurm.generation}: answers its models could not read: {unparsable or 'none'}")
    records = proxy.audit_records()
    assert not [r for r in records if r.get("local_user") == "root"]


def drive(generated: Generated, client: Any, slurm: SlurmCluster, version: str) -> list[str]:
    """Ping, submit, get, list, update and cancel in one API version, with the generated code.

    Returns the answers the generated models could not read (slurmrestd's, checked to be so)."""
    api = f"/slurm/{version}"
    unparsable = []
    ping = send(generated.operation("GET", f"{api}/ping/"), client)
    assert ping.status == 200 and ping.parsed is not None and ping.parsed.pings, (version, ping)

    submit = generated.operation("POST", f"{api}/job/submit")
    body = job_body(version, slurm.job_dir("alice"), script="#!/bin/bash\nsleep 600\n", name=f"gen-{version}")
    submitted = send(submit, client, body=body_model(submit).from_dict(body))
    assert submitted.status == 200 and submitted.parsed is not None, (version, submitted)
    job_id = int(submitted.parsed.job_id)
    # Running: slurmrestd shows a pending job's job_resources as null or partly empty, which its own
    # schema does not allow, and the generated models refuse that (a slurmrestd quirk, not the proxy's).
    seen = slurm.wait_job(job_id, states=("RUNNING",))
    assert seen["UserId"] == "alice(2001)", seen  # the forged X-SLURM-USER-NAME never reached slurmrestd

    shown = send(generated.operation("GET", f"{api}/job/{{job_id}}"), client, str(job_id))
    assert shown.status == 200 and int(shown.parsed.jobs[0].job_id) == job_id, (version, shown)
    listed = send(generated.operation("GET", f"{api}/jobs/"), client)
    assert listed.status == 200, (version, listed)
    if listed.parsed is not None:
        assert job_id in {int(j.job_id) for j in listed.parsed.jobs}, version
    else:  # another job of the session is pending or was cancelled while pending: its job_resources is null
        jobs = json.loads(listed.text)["jobs"]
        assert job_id in {j["job_id"] for j in jobs} and any(j.get("job_resources", {}) is None for j in jobs)
        unparsable.append(f"{version} list ({listed.unparsable}): a job's job_resources is null")

    update = generated.operation("POST", f"{api}/job/{{job_id}}")
    comment = {"comment": f"updated by the generated {version} client"}
    if version == "v0.0.38":  # its document makes environment required in every job description
        comment["environment"] = body["job"]["environment"]
    updated = send(update, client, str(job_id), body=body_model(update).from_dict(comment))
    assert updated.status == 200, (version, updated)
    assert slurm.job(job_id)["Comment"] == comment["comment"]

    cancelled = send(generated.operation("DELETE", f"{api}/job/{{job_id}}"), client, str(job_id))
    assert cancelled.status == 200, (version, cancelled)
    assert slurm.wait_job(job_id, states=("CANCELLED",))["JobState"] == "CANCELLED"
    for what, answer in (("update", updated), ("cancel", cancelled)):
        if answer.unparsable is not None:
            assert '"results": null' in answer.text, answer  # slurmrestd's answer, not the proxy's
            unparsable.append(f"{version} {what} ({answer.unparsable}): results is null")
    return unparsable
