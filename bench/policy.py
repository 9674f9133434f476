"""The proxy's own cost of policy decisions and job-body checks per request, and of reloading.

    .venv/bin/python -m bench.policy [--quick]

Builds site policies of 5, 50 and 500 VO rules (each with entitlements and job constraints) in a
scratch directory and times, in-process: ``evaluate`` (the caller matches the first rule, the last
rule, or none), ``decide_job`` on typical v0.0.38 and v0.0.42 submissions, a heterogeneous job and
a 1 MiB body, then ``load_policy`` and the reload watcher's ``fingerprint``. Prints a table;
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory
from types import MappingProxyType
from typing import Any

import yaml

from slurmproxy.core.entitlements import parse_all
from slurmproxy.core.principal import Principal
from slurmproxy.core.slurmrest import JobRequest
from slurmproxy.policy import Policy, evaluate, load_policy
from slurmproxy.policy.jobs.decide import decide_job
from slurmproxy.policy.reload import fingerprint

ISSUER = "https://aai.egi.eu/auth/realms/egi"


def vo(n: int) -> str:
    return f"urn:mace:egi.eu:group:vo{n}.example.org:role=member#aai.egi.eu"


def site(rules: int) -> dict[str, Any]:
    return {
        "rules": [
            {
                "id": f"vo{n}",
                "entitlements": [vo(n), {"group": f"vo{n}.example.org", "subgroups": ["hpc"], "role": "member"}],
                "allow": ["ping", "read-only", "submit", "update-own", "cancel-own"],
                "mapping": [{"service_account": f"svc{n}"}],
                "job": {
                    "accounts": [f"vo{n}", f"vo{n}-extra"],
                    "partitions": ["debug", "long"],
                    "qos": ["normal"],
                    "max_time": "2-00:00:00",
                    "max_nodes": 4,
                    "max_cpus": 128,
                },
            }
            for n in range(rules)
        ]
    }


def principal(*entitlements: str) -> Principal:
    held = (*entitlements, "urn:mace:egi.eu:res:rcauth#aai.egi.eu", "urn:mace:egi.eu:group:other.org#aai.egi.eu")
    parsed = parse_all(held)
    return Principal(ISSUER, "someone@egi.eu", MappingProxyType({}), held, 0.0, "t", parsed.valid, parsed.malformed)


def job_38() -> bytes:
    env = {f"VAR_{n}": "x" * 20 for n in range(20)} | {"PATH": "/usr/bin:/bin"}
    job = {"name": "bench", "current_working_directory": "/home/u", "environment": env, "tasks": 4}
    return json.dumps({"script": "#!/bin/bash\n" + "echo hello\n" * 20, "job": job}).encode()


def job_42(components: int = 1, env_vars: int = 20) -> bytes:
    env = [f"VAR_{n}={'x' * 20}" for n in range(env_vars)] + ["PATH=/usr/bin:/bin"]
    job = {"name": "bench", "current_working_directory": "/home/u", "environment": env, "tasks": 4}
    job |= {"time_limit": {"set": True, "infinite": False, "number": 60}, "partition": "long"}
    script = "#!/bin/bash\n" + "echo hello\n" * 20
    if components == 1:
        return json.dumps({"job": {**job, "script": script}}).encode()
    return json.dumps({"script": script, "jobs": [dict(job, tasks=1) for _ in range(components)]}).encode()


def per_call(fn: Callable[[], object], budget: float) -> tuple[float, float]:
    """Median and 99th percentile of one call, in microseconds, over ~``budget`` seconds."""
    fn()
    samples: list[float] = []
    end = time.perf_counter() + budget
    while time.perf_counter() < end:
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


Case = tuple[str, Callable[[], object]]
JOBS = "/slurm/v0.0.42/jobs"


def evaluation_cases(policy: Policy, directory: Path, size: int) -> list[Case]:
    first, last, nobody = principal(vo(0)), principal(vo(size - 1)), principal()
    return [
        ("evaluate, caller matches the first rule", partial(evaluate, policy, first, "GET", JOBS)),
        ("evaluate, caller matches the last rule", partial(evaluate, policy, last, "GET", JOBS)),
        ("evaluate, no rule admits (deny)", partial(evaluate, policy, nobody, "GET", JOBS)),
        ("evaluate with explain trace, last rule", partial(evaluate, policy, last, "GET", JOBS, explain=True)),
        ("fingerprint (reload watcher poll)", partial(fingerprint, [directory], policy.inputs)),
    ]


def job_cases(policy: Policy) -> list[Case]:
    who = principal(vo(0))
    cases: list[Case] = []
    for version, raw in [
        ("v0.0.38", job_38()),
        ("v0.0.42", job_42()),
        ("v0.0.42 het x4", job_42(components=4)),
        ("v0.0.42", job_42(env_vars=25000)),
    ]:
        size = f"{len(raw)} B" if len(raw) < 10_000 else f"{len(raw) // 1024} KiB"
        request = JobRequest("submit", version.split()[0])
        path = f"/slurm/{request.version}/job/submit"
        cases.append((f"decide_job {version} ({size})", partial(decide_job, policy, who, "POST", path, request, raw)))
    return cases


def run(budget: float) -> None:
    print(f"{'what':<58} {'median':>10} {'p99':>10}")
    for size in (5, 50, 500):
        with TemporaryDirectory() as tmp:
            directory = Path(tmp)
            (directory / "site.yaml").write_text(yaml.safe_dump(site(size)))
            started = time.perf_counter()
            policy = load_policy([directory])
            load_ms = (time.perf_counter() - started) * 1000
            cases = evaluation_cases(policy, directory, size) + (job_cases(policy) if size == 50 else [])
            print(f"-- {size} rules (load_policy: {load_ms:.1f} ms)")
            for name, fn in cases:
                median, p99 = per_call(fn, budget)
                print(f"   {name:<55} {median:>8.1f}µs {p99:>8.1f}µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="0.2 s per figure instead of 1 s")
    run(0.2 if parser.parse_args().quick else 1.0)


if __name__ == "__main__":
    main()
