"""Session-wide real components: Slurm 22.05, 24.11 and 26.05, the OpenID provider, and factories for proxy servers.

Nothing here skips: a component that cannot start raises, and the run fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import SlurmCluster
from devstack.provider import MEMBER_ENTITLEMENT, OTHER_VO_ENTITLEMENT, PROXY_AUDIENCE, OidcProvider, default_config
from devstack.proxy import ProxyServer

ProxyFactory = Callable[..., ProxyServer]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)


GENERATIONS = ["22.05", "24.11", "26.05"]


@pytest.fixture(scope="session", params=GENERATIONS, ids=[f"slurm-{g}" for g in GENERATIONS])
def slurm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Every integration test runs against Slurm 22.05 (v0.0.38), 24.11 (v0.0.40 to v0.0.42) and 26.05
    (v0.0.42 to v0.0.45)."""
    with SlurmCluster(tmp_path_factory.mktemp(f"slurm-{request.param}"), request.param) as cluster:
        yield cluster


@pytest.fixture
def api(slurm: SlurmCluster) -> str:
    """The newest OpenAPI version the cluster serves, as a path prefix: ``/slurm/v0.0.38``."""
    return f"/slurm/{slurm.api_versions[-1]}"


@pytest.fixture(scope="session")
def oidc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    with OidcProvider(tmp_path_factory.mktemp("oidc"), default_config()) as provider:
        yield provider


def site_policy(issuer: str) -> dict[str, Any]:
    """The example site policy, with the test provider as the issuer of the mapping table."""
    return {
        "rules": [
            {
                "id": "example-members",
                "entitlements": [MEMBER_ENTITLEMENT],
                "allow": ["ping", "read-only", "openapi", "submit", "update-own", "cancel-own"],
                "mapping": [{"table": "users"}, {"service_account": "svc-alpha"}],
            },
            {
                "id": "other-members",
                "entitlements": [OTHER_VO_ENTITLEMENT],
                "allow": ["ping", "read-only", "submit", "cancel-own"],
                "mapping": [{"service_account": "svc-beta"}],
            },
        ],
        "tables": {"users": {"entries": [{"issuer": issuer, "subject": "alice", "user": "alice"}]}},
    }


def proxy_config(slurm: SlurmCluster, issuers: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "oidc": {"issuers": issuers, "http_timeout_seconds": 3},
        "upstream": {"url": slurm.url, "auth": "mint", "jwt_key_file": str(slurm.jwt_key_path)},
        "identity": {"min_uid": 1000, "require_local_account": True},
    }
    for name, value in sections.items():
        config[name] = {**config.get(name, {}), **value}
    return config


@pytest.fixture(scope="session")
def proxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    started: list[ProxyServer] = []

    def start(config: dict[str, Any], policies: dict[str, Any] | None = None) -> ProxyServer:
        server = ProxyServer(tmp_path_factory.mktemp("proxy"), config, policies)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def proxy(slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory) -> ProxyServer:
    """The proxy as a site would run it: one issuer with an audience, the site policy, minted tokens."""
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    return proxy_factory(proxy_config(slurm, [issuer]), {"site.yaml": site_policy(oidc.issuer)})


@pytest.fixture
def request_id() -> str:
    return f"it-{uuid.uuid4().hex[:12]}"


def records_for(server: ProxyServer, request_id: str) -> list[dict[str, Any]]:
    return [r for r in server.audit_records() if r["request_id"] == request_id]


def call(
    server: ProxyServer,
    method: str,
    path: str,
    *,
    token: str | None = None,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    if request_id is not None:
        all_headers["X-Request-ID"] = request_id
    return httpx.request(method, server.url + path, headers=all_headers, timeout=60, **kwargs)


def job_body(
    version: str, directory: Path, script: str = "#!/bin/bash\nid\n", name: str = "slurmproxy-test", **job: Any
) -> dict[str, Any]:
    """A batch job in the body shape of ``version``: v0.0.38 takes the environment as an object,
    v0.0.39 and later as ``K=V`` strings."""
    path = "/usr/bin:/bin"
    environment: dict[str, str] | list[str] = {"PATH": path} if version.endswith("v0.0.38") else [f"PATH={path}"]
    return {
        "script": script,
        "job": {
            "name": name,
            "partition": "debug",
            "current_working_directory": str(directory),
            "standard_output": str(directory / "out-%j.txt"),
            "environment": environment,
            **job,
        },
    }


def ping_up(body: dict[str, Any]) -> bool:
    """Whether a ping answer says slurmctld is up: v0.0.38 ``ping: "UP"``, v0.0.40 to v0.0.44
    ``pinged: "UP"``, v0.0.45 (26.05) ``responding: true`` (it has no ``pinged``)."""
    pings = body.get("pings") or []

    def up(ping: dict[str, Any]) -> bool:
        if "responding" in ping:
            return ping["responding"] is True
        return ping.get("ping", ping.get("pinged")) == "UP"

    return bool(pings) and all(up(p) for p in pings)
