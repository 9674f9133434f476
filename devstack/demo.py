"""The main job, end to end: slurmproxy in front of a real Slurm, with a real OpenID provider and
the example policies in ``policies/``. Ends with a job submitted through the proxy, its output
(written by the mapped Unix user) and its audit record.

Run it with ``./scripts/demo`` (which sets everything up first), or ``python -m devstack.demo``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from devstack import GENERATIONS, SlurmCluster
from devstack.provider import PROXY_AUDIENCE, OidcProvider, default_config
from devstack.proxy import ProxyServer

ROOT = Path(__file__).resolve().parent.parent
DEMO_ISSUER_PORT = 18400  # the example mapping table (policies/users.yaml) names this issuer


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(data: Any) -> None:
    print(json.dumps(data, indent=2), flush=True)


def run(workdir: Path, generation: str) -> int:
    say(f"starting Slurm {generation} (munge, slurmctld, slurmd, slurmrestd with rest_auth/jwt)")
    with SlurmCluster(workdir / "slurm", generation) as slurm:  # type: ignore[arg-type]
        print(f"slurmrestd at {slurm.url}, OpenAPI {', '.join(slurm.api_versions)}")
        say("starting the OpenID provider (panva oidc-provider)")
        with OidcProvider(workdir / "oidc", default_config(), port=DEMO_ISSUER_PORT) as oidc:
            print(f"issuer {oidc.issuer}")
            config = {
                "oidc": {"issuers": [{"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}]},
                "upstream": {"url": slurm.url, "auth": "mint", "jwt_key_file": str(slurm.jwt_key_path)},
                "identity": {"min_uid": 1000, "require_local_account": True},
                "policy": {"paths": [str(ROOT / "policies")]},
            }
            say("starting slurmproxy with the example policies in policies/")
            with ProxyServer(workdir / "proxy", config) as proxy:
                print(f"slurmproxy at {proxy.url} (config {proxy.config_path})")
                return submit_job(proxy, slurm, oidc)


def submit_job(proxy: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider) -> int:
    say("alice gets an access token from the provider (client credentials)")
    token = oidc.client_credentials_token("alice-cli")
    print(f"token: {token[:24]}… ({len(token)} characters; entitlements inside the token)")

    directory = slurm.job_dir("alice")
    version = slurm.api_versions[-1]
    body = {
        "script": '#!/bin/bash\necho "hello from $(hostname)"\nid\n',
        "job": {
            "name": "slurmproxy-demo",
            "partition": "debug",
            "current_working_directory": str(directory),
            "standard_output": str(directory / "demo-%j.out"),
            "environment": {"PATH": "/usr/bin:/bin"} if version == "v0.0.38" else ["PATH=/usr/bin:/bin"],
        },
    }
    say(f"POST {proxy.url}/slurm/{version}/job/submit (with X-SLURM-USER-NAME: root, which the proxy strips)")
    response = httpx.post(
        f"{proxy.url}/slurm/{version}/job/submit",
        json=body,
        headers={"Authorization": f"Bearer {token}", "X-SLURM-USER-NAME": "root", "X-Request-ID": "demo-submit"},
        timeout=60,
    )
    print(f"HTTP {response.status_code}")
    show(response.json())
    if response.status_code != 200:
        return 1
    job_id = response.json()["job_id"]

    say(f"waiting for job {job_id} (Slurm's own view, scontrol)")
    job = slurm.wait_job(job_id)
    print(f"JobState={job['JobState']} UserId={job['UserId']} Partition={job['Partition']}")
    say("the job's output, written by the mapped Unix user")
    output = directory / f"demo-{job_id}.out"
    for _ in range(50):
        if output.exists() and output.stat().st_size:
            break
        time.sleep(0.1)
    print(output.read_text(), end="")

    say("the audit record of that request")
    records = [r for r in proxy.audit_records() if r["request_id"] == "demo-submit"]
    show(records)
    ok = job["JobState"] == "COMPLETED" and job["UserId"].startswith("alice(") and len(records) == 1
    say("done: the job ran as alice" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--generation", choices=list(GENERATIONS), default="22.05")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a new temporary one)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="slurmproxy-demo-", dir="/var/tmp"))
    return run(workdir, args.generation)


if __name__ == "__main__":
    raise SystemExit(main())
