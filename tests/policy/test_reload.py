from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pytest_httpx import HTTPXMock

from slurmproxy.config.settings import Settings, load_settings
from slurmproxy.policy import Policy, load_policy
from slurmproxy.policy.reload import PolicyReloader, fingerprint, reloading
from tests.asgi import app_session
from tests.fakeupstream import ThreadedFakeSlurmrestd as Upstream
from tests.helpers import UPSTREAM, Signer, basic_policy, make_settings, write_policy

pytestmark = pytest.mark.anyio
SUBMIT = "/slurm/v0.0.42/job/submit"


async def until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait (bounded, generously) for something the proxy does in the background."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def reloader_for(directory: Path) -> tuple[PolicyReloader, list[Policy]]:
    applied: list[Policy] = []
    first = load_policy([directory])
    return PolicyReloader([directory], lambda: load_policy([directory]), applied.append, first), applied


async def test_reload_applies_a_good_policy(tmp_path: Path) -> None:
    write_policy(tmp_path, basic_policy())
    reloader, applied = reloader_for(tmp_path)
    write_policy(tmp_path, basic_policy(id="renamed"))
    assert await reloader.reload("test") is True
    assert [r.id for r in applied[-1].rules] == ["renamed"]
    status = reloader.status
    assert (status.ok, status.reloads, status.failures, status.last_trigger) == (True, 1, 0, "test")
    assert status.digest == applied[-1].digest and status.errors == []


async def test_a_broken_file_keeps_the_last_good_policy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_policy(tmp_path, basic_policy())
    reloader, applied = reloader_for(tmp_path)
    good_digest = reloader.status.digest
    (tmp_path / "policy.yaml").write_text("rules: [")
    assert await reloader.reload("SIGHUP") is False
    assert applied == []
    status = reloader.status.as_dict()
    assert status["status"].startswith("stale") and status["failures"] == 1 and status["digest"] == good_digest
    assert any("not valid YAML" in e for e in status["errors"])
    assert "keeping the policy loaded at" in caplog.text
    write_policy(tmp_path, basic_policy(allow=["nope"]))
    assert await reloader.reload("file change") is False
    assert "unknown operation group 'nope'" in reloader.status.errors[0]
    write_policy(tmp_path, basic_policy())
    assert await reloader.reload("file change") is True
    assert reloader.status.ok and reloader.status.failures == 2 and reloader.status.errors == []


async def test_an_unexpected_error_is_contained(tmp_path: Path) -> None:
    write_policy(tmp_path, basic_policy())
    first = load_policy([tmp_path])

    def explode() -> Policy:
        raise RuntimeError("disk on fire")

    reloader = PolicyReloader([tmp_path], explode, lambda p: None, first)
    assert await reloader.reload("test") is False
    assert reloader.status.errors == ["unexpected error: RuntimeError: disk on fire"]


def test_fingerprint_sees_edits_new_files_removals_and_tables(tmp_path: Path) -> None:
    write_policy(tmp_path, basic_policy())
    table = tmp_path / "elsewhere" / "users.csv"
    table.parent.mkdir()
    table.write_text("issuer,subject,user\n")
    seen = [fingerprint([tmp_path], [str(table)])]
    (tmp_path / "policy.yaml").write_text((tmp_path / "policy.yaml").read_text() + "\n# edited\n")
    seen.append(fingerprint([tmp_path], [str(table)]))
    (tmp_path / "more.yaml").write_text("rules: []\n")
    seen.append(fingerprint([tmp_path], [str(table)]))
    (tmp_path / "ignored.txt").write_text("not a policy")
    assert fingerprint([tmp_path], [str(table)]) == seen[-1]
    table.write_text("issuer,subject,user\nx,y,z\n")
    seen.append(fingerprint([tmp_path], [str(table)]))
    (tmp_path / "more.yaml").unlink()
    seen.append(fingerprint([tmp_path], [str(table)]))
    assert len(set(seen)) == len(seen)


async def test_watcher_reloads_a_change_and_does_not_retry_a_broken_one(tmp_path: Path) -> None:
    write_policy(tmp_path, basic_policy())
    reloader, applied = reloader_for(tmp_path)
    async with reloading(reloader, interval=0.02):
        write_policy(tmp_path, basic_policy(id="second"))
        await until(lambda: reloader.status.reloads == 1)
        assert [r.id for r in applied[-1].rules] == ["second"]
        (tmp_path / "policy.yaml").write_text("rules: [")
        await until(lambda: reloader.status.failures == 1)
        write_policy(tmp_path, basic_policy(id="third"))
        await until(lambda: reloader.status.reloads == 2)
    assert reloader.status.failures == 1 and [r.id for r in applied[-1].rules] == ["third"]


async def test_sighup_reloads(tmp_path: Path) -> None:
    write_policy(tmp_path, basic_policy())
    reloader, applied = reloader_for(tmp_path)
    async with reloading(reloader, interval=0):
        write_policy(tmp_path, basic_policy(id="after-hup"))
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: reloader.status.reloads == 1)
    assert reloader.status.last_trigger == "SIGHUP" and applied[-1].rules[0].id == "after-hup"


# --- in the running app -----------------------------------------------------------------------------


def settings_with(tmp_path: Path, policy: dict[str, Any], interval: float) -> Settings:
    make_settings(tmp_path, policy)
    config = tmp_path / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["policy"]["reload_interval_seconds"] = interval
    config.write_text(yaml.safe_dump(data))
    return load_settings(config)


def job_policy(partitions: list[str], allow: list[str] | None = None) -> dict[str, Any]:
    return basic_policy(allow=allow or ["ping", "submit"], job={"partitions": partitions})


async def test_app_reloads_on_file_change_and_reports_a_broken_file(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.42/ping", json={}, is_reusable=True)
    upstream.add_response(url=f"{UPSTREAM}/openapi/v3", json={}, is_reusable=True)
    settings = settings_with(tmp_path, job_policy(["debug"]), 0.02)
    headers = {"Authorization": f"Bearer {signer.token()}"}
    async with app_session(settings) as (client, state):
        runtime = state["runtime"]
        assert (await client.get("/slurm/v0.0.42/ping", headers=headers)).status_code == 200
        write_policy(tmp_path / "policies", job_policy(["debug"], allow=["submit"]))
        await until(lambda: runtime.policy_reloader.status.reloads == 1)
        refused = await client.get("/slurm/v0.0.42/ping", headers=headers)
        assert refused.json()["slurmproxy"]["reason"] == "operation_not_allowed"
        (tmp_path / "policies" / "policy.yaml").write_text("rules: [")
        await until(lambda: runtime.policy_reloader.status.failures == 1)
        ready = (await client.get("/_slurmproxy/ready", headers=headers)).json()
        still = await client.get("/slurm/v0.0.42/ping", headers=headers)
    details = ready["checks"]["policy"]
    assert details["status"].startswith("stale") and details["rules"] == 1
    assert any("not valid YAML" in e for e in details["errors"]) and details["last_trigger"] == "file change"
    assert still.json()["slurmproxy"]["reason"] == "operation_not_allowed"  # the last good policy, not the broken one


async def test_in_flight_requests_finish_under_the_policy_they_started_with(
    tmp_path: Path, httpx_mock: HTTPXMock, signer: Signer, upstream: Upstream
) -> None:
    upstream.add_response(url=f"{UPSTREAM}{SUBMIT}", method="POST", json={"job_id": 1})
    settings = settings_with(tmp_path, job_policy(["debug"]), 0)
    body = json.dumps({"job": {"partition": "debug", "environment": ["A=1"]}}).encode()
    half_sent, reloaded = asyncio.Event(), asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield body[:10]
        half_sent.set()
        await reloaded.wait()
        yield body[10:]

    headers = {"Authorization": f"Bearer {signer.token()}", "content-type": "application/json"}
    async with app_session(settings) as (client, state):
        runtime = state["runtime"]
        request = asyncio.create_task(client.post(SUBMIT, content=slow_body(), headers=headers))
        await half_sent.wait()
        write_policy(tmp_path / "policies", job_policy(["long"]))  # debug is no longer allowed
        assert await runtime.policy_reloader.reload("test")
        reloaded.set()
        started_before = await request
        started_after = await client.post(SUBMIT, content=body, headers=headers)
    assert started_before.status_code == 200, started_before.text
    assert started_after.json()["slurmproxy"]["reason"] == "job_partition_not_allowed"
    assert yaml.safe_load((tmp_path / "policies" / "policy.yaml").read_text())["rules"][0]["job"]["partitions"] == [
        "long"
    ]


def shared_account_policy() -> dict[str, Any]:
    policy = basic_policy(job={"accounts": ["a"]})
    policy["rules"].append(
        {
            "id": "other-vo",
            "entitlements": ["urn:mace:egi.eu:group:vo.other.org:role=member#aai.egi.eu"],
            "allow": ["ping"],
            "mapping": [{"service_account": "svc-alpha"}],
        }
    )
    return policy


async def test_policy_warnings_are_logged_at_start_up_and_on_reload(
    tmp_path: Path, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, shared_account_policy())
    async with app_session(settings) as (_, state):
        started = [r for r in caplog.records if "local account svc-alpha is reachable" in r.getMessage()]
        assert [r.levelname for r in started] == ["WARNING"]
        caplog.clear()
        write_policy(tmp_path / "policies", {**shared_account_policy(), "operations": {"x": []}})
        assert await state["runtime"].policy_reloader.reload("test") is True
        reloaded = [r for r in caplog.records if "local account svc-alpha is reachable" in r.getMessage()]
        assert [r.name for r in reloaded] == ["slurmproxy.policy"]
