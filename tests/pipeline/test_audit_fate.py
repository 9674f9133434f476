"""Issue 15, item 10: the audit record's fate is certain for requests that change state, and no sink
write blocks the event loop.

Before, the one record of a submission was written after slurmrestd acted: when that write failed the
client got 503 although the job existed (a retry submitted it twice), and the stdout sink wrote on the
event loop, so a stalled pipe froze the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from slurmproxy.audit.file import AuditFile
from tests.asgi import app_session
from tests.fakeupstream import ThreadedFakeSlurmrestd as Upstream
from tests.helpers import UPSTREAM, Signer, make_settings

pytestmark = pytest.mark.anyio
SUBMIT = "/slurm/v0.0.38/job/submit"
JOB = {"script": "#!/bin/bash\nid", "job": {"environment": {"PATH": "/bin"}, "current_working_directory": "/tmp"}}


def records(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def failing_writes(monkeypatch: pytest.MonkeyPatch, fails: Callable[[bytes], bool]) -> Iterator[None]:
    """Audit lines for which ``fails`` is true cannot be written (as on a full or broken disk)."""
    write = AuditFile.write

    def maybe(self: AuditFile, line: bytes) -> None:
        if fails(line):
            raise OSError(28, "No space left on device")
        write(self, line)

    monkeypatch.setattr(AuditFile, "write", maybe)
    yield


async def test_the_intent_record_is_written_before_slurmrestd_acts(
    tmp_path: Path, signer: Signer, upstream: Upstream
) -> None:
    release = threading.Event()
    upstream.add_response(url=f"{UPSTREAM}{SUBMIT}", method="POST", json={"job_id": 42}, hold=release)
    headers = {"Authorization": f"Bearer {signer.token()}", "X-Request-ID": "submit-1"}
    try:
        async with app_session(make_settings(tmp_path)) as (client, _):
            answer = asyncio.create_task(client.post(SUBMIT, json=JOB, headers=headers))
            await until(lambda: len(upstream.get_requests()) == 1, "the submission reaches slurmrestd")
            (intent,) = records(tmp_path)  # while slurmrestd holds it: the intent, already written
            release.set()
            response = await answer
    finally:
        release.set()
    assert response.status_code == 200 and response.json()["job_id"] == 42
    assert (intent["kind"], intent["request_id"], intent["status"], intent["decision"]) == (
        "intent",
        "submit-1",
        None,
        "allow",
    )
    assert (intent["local_user"], intent["rule"], intent["operation"]) == ("alice", "members", "submit")
    _, outcome = records(tmp_path)
    assert (outcome["kind"], outcome["request_id"], outcome["status"], outcome["job_id"]) == (
        "outcome",
        "submit-1",
        200,
        42,
    )


async def test_an_outcome_that_cannot_be_written_still_answers_the_client(
    tmp_path: Path,
    signer: Signer,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The job exists: the client must learn its id (a 503 makes it submit again); the intent is in the
    audit log, the outcome in the application log, and the failure is counted."""
    upstream.add_response(url=f"{UPSTREAM}{SUBMIT}", method="POST", json={"job_id": 43})
    headers = {"Authorization": f"Bearer {signer.token()}", "X-Request-ID": "submit-2"}
    with failing_writes(monkeypatch, lambda line: b'"status":200' in line):
        async with app_session(make_settings(tmp_path)) as (client, state):
            response = await client.post(SUBMIT, json=JOB, headers=headers)
            failures = state["runtime"].metrics.audit_failures._value.get()
    assert response.status_code == 200 and response.json()["job_id"] == 43
    (intent,) = records(tmp_path)
    assert intent["kind"] == "intent" and intent["request_id"] == "submit-2"
    logged = [r.getMessage() for r in caplog.records if r.name == "slurmproxy.audit"]
    assert any('"request_id":"submit-2"' in m and '"job_id":43' in m and '"kind":"outcome"' in m for m in logged)
    assert failures == 1


async def test_an_intent_that_cannot_be_written_refuses_before_anything_is_forwarded(
    tmp_path: Path, signer: Signer, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    headers = {"Authorization": f"Bearer {signer.token()}"}
    with failing_writes(monkeypatch, lambda line: b'"kind":"intent"' in line):
        async with app_session(make_settings(tmp_path)) as (client, _):
            response = await client.post(SUBMIT, json=JOB, headers=headers)
    assert response.status_code == 503 and response.json()["slurmproxy"]["reason"] == "audit_unavailable"
    assert upstream.get_requests() == []
    (refusal,) = records(tmp_path)
    assert (refusal["kind"], refusal["decision"], refusal["reason"]) == ("request", "error", "audit_unavailable")


def _fill(fifo: Path) -> None:
    """Fill the pipe's buffer, as a log collector that stopped reading leaves it."""
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


def _drain(fd: int, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            if not os.read(fd, 65536):
                return
        except BlockingIOError:
            stop.wait(0.01)


async def test_a_stalled_pipe_never_blocks_the_event_loop(
    tmp_path: Path, signer: Signer, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sink that stops taking lines stalls one write (its request waits for it); the others fail closed
    within audit.write_timeout_seconds, and the loop keeps serving."""
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a collector that is there, but does not read
    _fill(fifo)
    upstream.add_response(url=f"{UPSTREAM}/slurm/v0.0.38/jobs", json={"jobs": []}, is_reusable=True)
    entered, progressed, stop, rescued = threading.Event(), threading.Event(), threading.Event(), threading.Event()
    write = AuditFile.write

    def observed(self: AuditFile, line: bytes) -> None:
        entered.set()  # the write begins: into a full pipe, it blocks until the pipe is drained
        write(self, line)

    monkeypatch.setattr(AuditFile, "write", observed)

    def watchdog() -> None:
        # Were the loop blocked by the write, the test could not go on: drain after a while, so that
        # it fails on its assertions instead of hanging.
        if not progressed.wait(30):
            rescued.set()
            _drain(reader, stop)

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    settings = make_settings(tmp_path, audit={"file": str(fifo), "max_bytes": 0, "write_timeout_seconds": 0.5})
    headers = {"Authorization": f"Bearer {signer.token()}"}
    drainer: threading.Thread | None = None
    try:
        async with app_session(settings) as (client, _):
            stalled = asyncio.create_task(client.get("/slurm/v0.0.38/jobs", headers=headers))
            assert await asyncio.to_thread(entered.wait, 30), "the first record's write did not begin"
            behind = await asyncio.wait_for(client.get("/slurm/v0.0.38/jobs", headers=headers), 60)
            live = await asyncio.wait_for(client.get("/_slurmproxy/live"), 30)
            stalled_meanwhile = not stalled.done() and not rescued.is_set()
            progressed.set()
            drainer = threading.Thread(target=_drain, args=(reader, stop), daemon=True)
            drainer.start()
            answered = await asyncio.wait_for(stalled, 60)
    finally:
        progressed.set()
        stop.set()
        if drainer is not None:
            drainer.join(10)
        guard.join(10)
        os.close(reader)
    assert stalled_meanwhile, "the loop waited for the stalled write"
    assert behind.status_code == 503 and behind.json()["slurmproxy"]["reason"] == "audit_unavailable"
    assert live.status_code == 200
    assert answered.status_code == 200
