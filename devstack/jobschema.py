"""The job-body rules of each slurmrestd API version, taken from the running slurmrestd.

slurmproxy checks job bodies against what each API version takes (``slurmproxy/policy/jobs/openapi/
<version>.json``). Those files are not written by hand: this module makes them from a real
slurmrestd of every generation the harness has.

* **Fields and value shapes** come from the version's OpenAPI document (``GET /openapi/v3``): the
  request body of ``POST /slurm/<version>/job/submit``, ``…/job/allocate`` and ``…/job/{job_id}``,
  with every ``$ref`` resolved and descriptions dropped, so the result does not depend on how the
  document names its schemas. Slurm's ``{set, infinite, number}`` structures become
  ``{"type": "no_val"}`` (v0.0.40 writes them inline, later versions as ``…_no_val_struct``).
* **What ``null`` means** is not in the document, so it is measured: for every field, one held job
  is submitted with ``"field": null`` and one without the field, and slurmrestd's two answers (and,
  when both are accepted, the two jobs as slurmrestd shows them) are compared. A field is then
  ``unset`` (null means "not set": the same outcome and the same job), ``refused`` (slurmrestd
  refuses null but takes the field left out), ``changes`` (both accepted, but the jobs differ: 22.05
  turns ``nice: null`` into nice 100) or ``crashes`` (slurmrestd died: 22.05 on ``argv: null``; it
  is restarted).

A version served by several generations (v0.0.42: 24.11 and 26.05) must have the same fields and
shapes in each; ``null`` counts as ``unset`` only where every generation says so.

    python -m devstack.jobschema write            # every generation; rewrites the committed files
    python -m devstack.jobschema write 24.11      # one generation (its versions only)
    python -m devstack.jobschema check            # compare without writing (exit 1 on a difference)

``tests/integration/test_job_schema.py`` checks the committed files against the running slurmrestd
of every generation in the integration tier, so a new Slurm package that changes a shape fails there.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from devstack.slurm import GENERATIONS, SlurmCluster

RULES_DIR = Path(__file__).resolve().parent.parent / "slurmproxy" / "policy" / "jobs" / "openapi"
NULL_VERDICTS = ("unset", "changes", "refused", "crashes")
FORWARDED = frozenset({"unset", "changes"})
"""Verdicts under which the proxy takes null (and forwards the job without the field); it refuses the others."""
_SKIPPED = frozenset({"user_id", "group_id"})  # never forwarded by the proxy: nothing to measure
_BODY_PATHS = {"submit": "/slurm/{version}/job/submit", "allocate": "/slurm/{version}/job/allocate"}
_UPDATE_PATH = "/slurm/{version}/job/{{job_id}}"


# --- fields and shapes, from the OpenAPI document ----------------------------------------------------------


def _resolve(document: dict[str, Any], schema: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """One schema, normalised: refs resolved, no descriptions, no-val structures named."""
    if depth > 12:
        raise ValueError("schema nested too deeply (a reference cycle?)")
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return _resolve(document, document["components"]["schemas"][name], depth + 1)
    out: dict[str, Any] = {"type": schema.get("type", "any")}
    for key in ("format", "enum", "minItems", "maxItems", "deprecated"):
        if key in schema:
            out[key] = schema[key]
    if out["type"] == "array":
        out["items"] = _resolve(document, schema.get("items") or {}, depth + 1)
    if out["type"] == "object" and schema.get("properties"):
        properties = schema["properties"]
        if set(properties) == {"set", "infinite", "number"}:  # Slurm's "no value" numbers, however named
            return {"type": "no_val", "format": properties["number"].get("format", "int64")}
        out["properties"] = {k: _resolve(document, v, depth + 1) for k, v in sorted(properties.items())}
    return out


def _request_schema(document: dict[str, Any], path: str) -> dict[str, Any] | None:
    operation = document["paths"].get(path, {}).get("post")
    if operation is None:
        return None
    schema: dict[str, Any] = operation["requestBody"]["content"]["application/json"]["schema"]
    return schema


def _job_ref(document: dict[str, Any], version: str) -> dict[str, Any]:
    update = _request_schema(document, _UPDATE_PATH.format(version=version))
    if update is None:
        raise ValueError(f"the document has no job update for {version}")
    return update


def extract(document: dict[str, Any], version: str) -> dict[str, Any]:
    """The fields and shapes of ``version``'s job bodies (no ``null`` measurements)."""
    job_schema = _job_ref(document, version)
    job = _resolve(document, job_schema)
    bodies: dict[str, Any] = {}
    for kind, template in _BODY_PATHS.items():
        schema = _request_schema(document, template.format(version=version))
        if schema is None:
            continue
        top = schema
        if "$ref" in schema:
            top = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        keys: dict[str, str] = {}
        for key, sub in sorted(top.get("properties", {}).items()):
            resolved = _resolve(document, sub)
            if resolved == job:
                keys[key] = "job"
            elif resolved.get("type") == "array" and resolved.get("items") == job:
                keys[key] = "jobs"
            else:
                keys[key] = resolved["type"]
        bodies[kind] = {"keys": keys, "required": sorted(top.get("required", []))}
    return {"version": version, "bodies": bodies, "job": job.get("properties", {})}


def versions_in(document: dict[str, Any]) -> list[str]:
    """The versions with a job update path, oldest first."""
    found = {p.split("/")[2] for p in document["paths"] if p.startswith("/slurm/") and p.endswith("/job/{job_id}")}
    return sorted(found, key=lambda v: tuple(int(n) for n in v[1:].split(".")))


# --- what null means, measured ------------------------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(value, list):
        out = {}
        for n, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{n}]"))
        return out or {prefix: []}
    return {prefix: value}


class NullProbe:
    """Submits held jobs as alice to one cluster and compares ``null`` with leaving the field out."""

    def __init__(self, cluster: SlurmCluster, version: str) -> None:
        self.cluster = cluster
        self.version = version
        self.client = httpx.Client(base_url=cluster.url, timeout=60)
        self._token = cluster.mint_token("alice", lifespan=3600)
        directory = cluster.job_dir("alice")
        environment: Any = {"PATH": "/bin:/usr/bin"} if version == "v0.0.38" else ["PATH=/bin:/usr/bin"]
        self.base: dict[str, Any] = {
            "name": "jobschema",
            "partition": "debug",
            "current_working_directory": str(directory),
            "standard_output": "/dev/null",
            "environment": environment,
            "hold": True,
        }
        self.volatile: set[str] = set()
        self.differences: dict[str, list[str]] = {}
        self.submitted: list[int] = []

    def _headers(self) -> dict[str, str]:
        return {"X-SLURM-USER-NAME": "alice", "X-SLURM-USER-TOKEN": self._token}

    def submit(self, job: dict[str, Any]) -> tuple[int, Any]:
        body = {"script": "#!/bin/sh\ntrue\n", "job": job}
        response = self.client.post(f"/slurm/{self.version}/job/submit", json=body, headers=self._headers())
        try:
            data = response.json()
        except ValueError:
            return response.status_code, None
        job_id = data.get("job_id") if isinstance(data, dict) else None
        if response.status_code == 200 and job_id:
            self.submitted.append(int(job_id))
            return 200, int(job_id)
        errors = data.get("errors") or [] if isinstance(data, dict) else []
        numbers = sorted(str(e.get("error_number", e.get("error_code", e.get("errno")))) for e in errors)
        return response.status_code, ",".join(numbers)

    def view(self, job_id: int) -> dict[str, Any]:
        response = self.client.get(f"/slurm/{self.version}/job/{job_id}", headers=self._headers())
        response.raise_for_status()
        jobs = response.json()["jobs"]
        # The job's own id shows in expanded paths (slurm-%j.out): not a difference between two jobs.
        own_id = re.compile(rf"(?<![0-9A-Za-z]){job_id}(?![0-9])")
        return {k: own_id.sub("%j", v) if isinstance(v, str) else v for k, v in _flatten(jobs[0]).items()}

    def learn_volatile(self) -> None:
        """Keys that differ between two identical submissions (ids, times, priorities)."""
        views = []
        for _ in range(2):
            status, job_id = self.submit(dict(self.base))
            if status != 200:
                raise RuntimeError(f"{self.version}: the base job was refused: {status} {job_id}")
            views.append(self.view(job_id))
        first, second = views
        self.volatile = {k for k in first.keys() | second.keys() if first.get(k) != second.get(k)}
        self.volatile |= {"priority", "priority.number", "submit_time", "submit_time.number", "job_id"}

    def _base_without(self, field: str) -> dict[str, Any]:
        base = {k: v for k, v in self.base.items() if k != field}
        if field == "hold":  # something else must keep the job from running
            base["begin_time"] = (
                int(time.time()) + 86400
                if self.version == "v0.0.38"
                else {
                    "set": True,
                    "number": int(time.time()) + 86400,
                }
            )
        return base

    def _restart(self) -> None:
        self.cluster.stop_slurmrestd()
        self.cluster.start_slurmrestd()

    def verdict(self, field: str, *, again: bool = True) -> str:
        """The field's null verdict. 22.05's slurmrestd may die a request or two after the one that
        broke it, so any lost connection means: restart it and measure this field again, once; only
        a crash on the null submission itself, twice, counts as ``crashes``."""
        try:
            return self._verdict(field)
        except httpx.TransportError:
            self._restart()
            if not again:
                return "crashes"
            return self.verdict(field, again=False)

    def _verdict(self, field: str) -> str:
        base = self._base_without(field)
        without = self.submit(base)
        with_null = self.submit({**base, field: None})
        if with_null[0] != 200 or without[0] != 200:
            return "unset" if with_null == without else "refused" if without[0] == 200 else "changes"
        a, b = self.view(without[1]), self.view(with_null[1])
        differing = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} - self.volatile
        if differing:
            self.differences[field] = sorted(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differing)
        return "unset" if not differing else "changes"

    def cancel(self) -> None:
        """Cancel the jobs this probe submitted (and only those: a test session shares the cluster)."""
        while self.submitted:
            batch, self.submitted = self.submitted[:200], self.submitted[200:]
            self.cluster.slurm_cmd(["scancel", *map(str, batch)], check=False)

    def close(self) -> None:
        self.cancel()
        self.client.close()


def measure_nulls(cluster: SlurmCluster, version: str, fields: Iterable[str]) -> dict[str, str]:
    probe = NullProbe(cluster, version)
    try:
        probe.learn_volatile()
        out: dict[str, str] = {}
        for n, field in enumerate(sorted(set(fields) - _SKIPPED)):
            out[field] = probe.verdict(field)
            if n % 20 == 19:
                probe.cancel()
        return out
    finally:
        probe.close()


# --- one generation, and the files ---------------------------------------------------------------------------


def openapi_document(cluster: SlurmCluster) -> dict[str, Any]:
    token = cluster.mint_token("alice", lifespan=300)
    headers = {"X-SLURM-USER-NAME": "alice", "X-SLURM-USER-TOKEN": token}
    response = httpx.get(f"{cluster.url}/openapi/v3", headers=headers, timeout=60)
    response.raise_for_status()
    document: dict[str, Any] = response.json()
    return document


def from_cluster(cluster: SlurmCluster, *, nulls: bool = True) -> dict[str, dict[str, Any]]:
    """The rules of every version ``cluster`` serves, by version."""
    document = openapi_document(cluster)
    out: dict[str, dict[str, Any]] = {}
    for version in versions_in(document):
        rules = extract(document, version)
        rules["generated_from"] = [f"Slurm {cluster.generation}"]
        if nulls:
            rules["null"] = measure_nulls(cluster, version, rules["job"])
        out[version] = rules
    return out


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One version as two generations serve it: the same shapes, null ``unset`` only where both agree."""
    if (a["bodies"], a["job"]) != (b["bodies"], b["job"]):
        raise ValueError(f"{a['version']} differs between {a['generated_from']} and {b['generated_from']}")
    merged = dict(a)
    merged["generated_from"] = sorted(set(a["generated_from"]) | set(b["generated_from"]))
    if "null" in a and "null" in b:
        order = {v: n for n, v in enumerate(NULL_VERDICTS)}
        merged["null"] = {k: max(a["null"][k], b["null"][k], key=order.__getitem__) for k in a["null"]}
    return merged


def render(rules: dict[str, Any]) -> str:
    ordered = {k: rules[k] for k in ("version", "generated_from", "bodies", "job", "null") if k in rules}
    return json.dumps(ordered, indent=1, sort_keys=False) + "\n"


def collect(generations: Iterable[str], *, nulls: bool = True) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for generation in generations:
        with (
            tempfile.TemporaryDirectory(prefix=f"jobschema-{generation}-") as workdir,
            SlurmCluster(Path(workdir), generation) as cluster,  # type: ignore[arg-type]
        ):
            for version, rules in from_cluster(cluster, nulls=nulls).items():
                found[version] = merge(found[version], rules) if version in found else rules
                print(f"{generation} {version}: {len(rules['job'])} fields", file=sys.stderr)
    return found


def committed(version: str) -> dict[str, Any] | None:
    path = RULES_DIR / f"{version}.json"
    if not path.exists():
        return None
    rules: dict[str, Any] = json.loads(path.read_text())
    return rules


def differences(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """What the proxy would do differently: fields, shapes, bodies, and null taken or refused.

    ``unset`` and ``changes`` are one class (the proxy forwards the job without the field), as are
    ``refused`` and ``crashes`` (the proxy refuses): which of the two within a class a run measures
    may vary with timing, and the proxy does the same either way.
    """
    version = new["version"]
    if old is None:
        return [f"{version}: no committed file"]
    out = []
    if old["bodies"] != new["bodies"]:
        out.append(f"{version}: the submit/allocate bodies differ")
    for field in sorted(old["job"].keys() | new["job"].keys()):
        if old["job"].get(field) != new["job"].get(field):
            out.append(f"{version}: job.{field}: {old['job'].get(field)} -> {new['job'].get(field)}")
    if "null" in new:
        for field, verdict in sorted(new["null"].items()):
            before = old.get("null", {}).get(field)
            if before is None or (before in FORWARDED) != (verdict in FORWARDED):
                out.append(f"{version}: null for {field}: {before} -> {verdict}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.jobschema", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["write", "check"])
    parser.add_argument("generations", nargs="*", default=list(GENERATIONS))
    args = parser.parse_args(argv)
    found = collect(args.generations)
    problems = []
    for version, rules in sorted(found.items()):
        if args.action == "write":
            RULES_DIR.mkdir(parents=True, exist_ok=True)
            (RULES_DIR / f"{version}.json").write_text(render(rules))
        else:
            problems.extend(differences(committed(version), rules))
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
