"""Faults with real processes: slurmrestd killed under load, slurmctld stopped, the proxy stopped
with SIGTERM under load. Every request gets an answer (or a clean refusal) within a bound, and the
audit log has exactly one record per answer."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from devstack import SlurmCluster
from devstack.provider import PROXY_AUDIENCE, OidcProvider
from devstack.proxy import ProxyServer
from tests.integration.conftest import ProxyFactory, call, job_body, ping_up, proxy_config, records_for, site_policy
from tests.integration.hostile import RestdLog
from tests.integration.test_policy import policy_status, wait_for

BOUND = 45.0  # seconds: a request not answered within it counts as hung


@dataclass
class Outcome:
    request_id: str
    started: float
    elapsed: float
    status: int | None = None
    reason: str | None = None
    error: str | None = None


@dataclass
class Load:
    """Worker threads sending one request after another (a fresh connection each) until stopped."""

    url: str
    token: str
    prefix: str
    workers: int = 4
    stop_when_refused: bool = False
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _in_flight: set[str] = field(default_factory=set)  # requests sent and not answered yet

    def start(self) -> Load:
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(self.workers)]
        for thread in self._threads:
            thread.start()
        return self

    def _run(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            rid = f"{self.prefix}-{worker}-{n}"
            n += 1
            started = time.monotonic()
            outcome = Outcome(rid, started, 0.0)
            self._in_flight.add(rid)
            try:
                response = httpx.get(
                    self.url, headers={"Authorization": f"Bearer {self.token}", "X-Request-ID": rid}, timeout=BOUND
                )
                outcome.status = response.status_code
                if response.headers.get("content-type", "").startswith("application/json"):
                    outcome.reason = (response.json().get("slurmproxy") or {}).get("reason")
            except httpx.HTTPError as exc:
                outcome.error = type(exc).__name__
            outcome.elapsed = time.monotonic() - started
            self.outcomes.append(outcome)
            self._in_flight.discard(rid)
            if outcome.error == "ConnectError" and self.stop_when_refused:
                return
            time.sleep(0.02)

    def wait_for(self, predicate: Callable[[list[Outcome]], bool], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(list(self.outcomes)):
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {Counter(self.summary())}"
            time.sleep(0.1)

    def wait_for_pending(self, count: int, timeout: float = 90) -> None:
        """Until ``count`` requests are sent and not answered (held somewhere on their way)."""
        deadline = time.monotonic() + timeout
        while len(self._in_flight) < count:
            assert time.monotonic() < deadline, f"only {len(self._in_flight)} requests pending, not {count}"
            time.sleep(0.05)

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # whatever happened, no worker outlives the test

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(BOUND + 10)
        assert not any(t.is_alive() for t in self._threads), "a request hung"
        return list(self.outcomes)

    def summary(self) -> list[str]:
        return [f"{o.status}/{o.reason}" if o.error is None else o.error for o in self.outcomes]


def answered(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status is not None]


@pytest.fixture(scope="module")
def faulty(slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory) -> ProxyServer:
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    config = proxy_config(slurm, [issuer], upstream={"timeout_seconds": 20, "connect_timeout_seconds": 3})
    return proxy_factory(config, {"site.yaml": site_policy(oidc.issuer)})


def test_slurmrestd_killed_and_restarted_under_load(
    faulty: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str, request_id: str
) -> None:
    with Load(faulty.url + f"{api}/jobs", oidc.client_credentials_token("alice-cli"), request_id) as load:
        try:
            load.wait_for(lambda o: sum(x.status == 200 for x in o) >= 10, "answers before the fault")
            killed_at = time.monotonic()
            slurm.kill_slurmrestd()
            load.wait_for(lambda o: sum(x.status == 502 and x.started > killed_at for x in o) >= 5, "502s")
            slurm.start_slurmrestd()
            restarted_at = time.monotonic()
            load.wait_for(lambda o: sum(x.status == 200 and x.started > restarted_at for x in o) >= 10, "recovery")
        finally:
            slurm.start_slurmrestd()
        outcomes = load.stop()
    assert [o for o in outcomes if o.error is not None] == [], "every request gets an answer"
    assert max(o.elapsed for o in outcomes) < BOUND
    assert {(o.status, o.reason) for o in outcomes} <= {(200, None), (502, "upstream_unreachable"), (503, None)}
    assert [o.status for o in outcomes[-8:]] == [200] * 8, "recovered without a proxy restart"
    records = {r["request_id"]: r for r in faulty.audit_records() if r["request_id"].startswith(request_id)}
    assert len(records) == len(outcomes)
    assert all(records[o.request_id]["status"] == o.status for o in outcomes)
    assert {r["decision"] for r in records.values() if r["status"] == 502} == {"error"}


def _node_idle(slurm: SlurmCluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "idle" not in slurm.slurm_cmd(["sinfo", "-h", "-o", "%t"], check=False).stdout:
        assert time.monotonic() < deadline, "the node did not come back after slurmctld restarted"
        time.sleep(0.5)


def test_slurmctld_stopped_gives_slurmrestds_json_errors(
    faulty: ProxyServer, slurm: SlurmCluster, oidc: OidcProvider, api: str, request_id: str
) -> None:
    token = oidc.client_credentials_token("alice-cli")
    slurm.stop_slurmctld()
    try:
        jobs = call(faulty, "GET", f"{api}/jobs", token=token, request_id=f"{request_id}-jobs")
        ping = call(faulty, "GET", f"{api}/ping", token=token, request_id=f"{request_id}-ping")
    finally:
        slurm.start_slurmctld()
        _node_idle(slurm)
    # 22.05 answers 500 (slurm_load_jobs: Unspecified error), 24.11 502 (Unable to contact slurm controller).
    assert jobs.status_code in {500, 502}, jobs.text[:300]
    assert jobs.headers["content-type"].startswith("application/json")
    errors = jobs.json()["errors"]
    assert errors and all(e.get("source") != "slurmproxy" for e in errors)
    assert any("slurm_load_jobs" in str(e) or "controller" in str(e).lower() for e in errors), errors
    (record,) = records_for(faulty, f"{request_id}-jobs")
    assert record["upstream_status"] == record["status"] == jobs.status_code and record["local_user"] == "alice"
    # ping is not an auth or health check in 24.11: 200 with the controller DOWN; 22.05 says 500.
    assert ping.status_code in {200, 500} and not ping_up(ping.json())
    again = call(faulty, "GET", f"{api}/jobs", token=token)
    assert again.status_code == 200, again.text[:300]


def _requests_waiting_at(port: int) -> int:
    """Connections to ``port`` with unread bytes: requests a stopped slurmrestd holds (from /proc)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        rx_queue = int(fields[4].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and rx_queue > 0:
            count += 1
    return count


def _wait_refused(server: ProxyServer) -> None:
    """Until the listening socket is closed: new connections are refused."""
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(server.url + "/_slurmproxy/live", timeout=2)
        except httpx.ConnectError:
            return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the proxy kept accepting connections after SIGTERM"
        time.sleep(0.05)


def test_sigterm_under_load_completes_in_flight_requests_and_refuses_new_ones(
    slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory, api: str, request_id: str
) -> None:
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    # Without coalescing every worker's request goes to slurmrestd on its own: when slurmrestd is stopped
    # just after reading one (no byte left in any socket queue), the next ones still queue at its socket,
    # which is how the test sees requests held. Coalesced, they would all wait on the one already read.
    config = proxy_config(slurm, [issuer], shield={"coalesce": False}, upstream={"max_connections_per_identity": 8})
    server = proxy_factory(config, {"site.yaml": site_policy(oidc.issuer)})
    assert server.proc is not None
    token = oidc.client_credentials_token("alice-cli")
    with Load(server.url + f"{api}/jobs", token, request_id, workers=6, stop_when_refused=True) as load:
        try:
            load.wait_for(lambda o: sum(x.status == 200 for x in o) >= 10, "answers before SIGTERM")
            slurm.pause_slurmrestd()
            # Requests are now in flight, held at slurmrestd.
            deadline = time.monotonic() + 30
            while _requests_waiting_at(slurm.restd_port) < 1:
                assert time.monotonic() < deadline, "no request reached slurmrestd"
                time.sleep(0.05)
            # Every worker's request is now held (each sent its next one, which cannot be answered).
            load.wait_for_pending(load.workers)
            in_flight = len(load.outcomes)
            signalled = time.monotonic()
            server.signal(signal.SIGTERM)
            _wait_refused(server)
        finally:
            slurm.resume_slurmrestd()
        load.wait_for(lambda o: sum(x.error == "ConnectError" for x in o) >= load.workers, "every worker refused")
        outcomes = load.stop()
    # uvicorn re-raises the signal once shut down, as init systems expect: "terminated by SIGTERM".
    assert server.proc.wait(BOUND) in {0, -signal.SIGTERM}
    assert "Finished server process" in server.log_path.read_text()
    # Requests sent before SIGTERM either were in flight and completed, or never got in (refused, or
    # closed unread by the shutting-down server: nothing was done, there is no record).
    held = [o for o in outcomes[in_flight:] if o.started < signalled]
    assert [o for o in outcomes[:in_flight] if o.status != 200] == []
    assert any(o.status == 200 for o in held), Counter(load.summary())
    assert all(o.status == 200 or o.error in {"ConnectError", "RemoteProtocolError"} for o in held)
    assert {o.error for o in outcomes if o.status is None} <= {"ConnectError", "RemoteProtocolError"}
    assert {o.status for o in answered(outcomes)} == {200}
    records = [r for r in server.audit_records() if r["request_id"].startswith(request_id)]
    assert len(records) == len(answered(outcomes))
    assert sorted(r["request_id"] for r in records) == sorted(o.request_id for o in answered(outcomes))


def test_a_policy_file_corrupted_during_live_reload_under_load(
    slurm: SlurmCluster, oidc: OidcProvider, proxy_factory: ProxyFactory, api: str, request_id: str
) -> None:
    """An admin edits the policy in place under load: the reloader sees a broken file (kept out:
    the last good policy decides), then the finished one (swapped in). No request fails or hangs,
    every answer comes from one policy or the other, and each has its record."""
    readers = site_policy(oidc.issuer)
    readers["rules"][0]["allow"] = ["ping", "read-only"]
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    config = proxy_config(slurm, [issuer], policy={"reload_interval_seconds": 0.2})
    proxy = proxy_factory(config, {"site.yaml": readers})
    assert proxy.proc is not None
    token = oidc.client_credentials_token("alice-cli")
    pid, digest = proxy.proc.pid, policy_status(proxy, token)["digest"]
    target = proxy.workdir / "policies" / "site.yaml"
    with Load(proxy.url + f"{api}/jobs", token, request_id) as load:
        load.wait_for(lambda o: sum(x.status == 200 for x in o) >= 10, "answers before the edit")
        target.write_text(target.read_text()[:120] + "\n  - {id: half-written, allow: [")  # in place, cut short
        wait_for("the failed reload", lambda: policy_status(proxy, token)["failures"] >= 1)
        broken_seen = len(load.outcomes)
        load.wait_for(lambda o: len(o) >= broken_seen + 10, "answers while the file is broken")
        assert {o.status for o in load.outcomes[broken_seen:]} == {200}  # the last good policy decides
        readers["rules"][0]["allow"] = ["ping"]
        target.write_text(yaml.safe_dump(readers))
        wait_for(
            "the reload",
            lambda: policy_status(proxy, token)["digest"] != digest and policy_status(proxy, token)["status"] == "ok",
        )
        reloaded = len(load.outcomes)
        load.wait_for(lambda o: sum(x.status == 403 for x in o[reloaded:]) >= 10, "answers under the new policy")
        outcomes = load.stop()
    assert [o for o in outcomes if o.error is not None] == []
    assert {(o.status, o.reason) for o in outcomes} <= {(200, None), (403, "operation_not_allowed")}
    assert {o.status for o in outcomes[reloaded + load.workers :]} == {403}
    assert proxy.proc.pid == pid and proxy.proc.poll() is None
    records = {r["request_id"]: r for r in proxy.audit_records() if r["request_id"].startswith(request_id)}
    assert len(records) == len(outcomes) and all(records[o.request_id]["status"] == o.status for o in outcomes)
    assert "policy reload (file change) failed" in proxy.log_tail(2000)


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 1 MiB tmpfs for the audit file (outside pytest's temporary tree: it is a mount point)."""
    mount = Path(tempfile.mkdtemp(prefix="slurmproxy-auditfs-", dir="/var/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while os.write(fd, b"\0" * 4096):
                pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("fail_closed", [True, False], ids=["fail-closed", "fail-open"])
def test_an_unwritable_audit_sink_fails_as_configured(
    slurm: SlurmCluster,
    oidc: OidcProvider,
    proxy_factory: ProxyFactory,
    api: str,
    request_id: str,
    small_fs: Path,
    fail_closed: bool,
) -> None:
    """The audit file's filesystem fills up; then the audit file is replaced by a directory (it can no
    longer be opened). Fail-closed: 503 ``audit_unavailable`` **before** anything is forwarded, so no
    job runs without its record; then recovery without a restart. Fail-open: the requests go on and
    their records go to the application log."""
    issuer = {"issuer": oidc.issuer, "audiences": [PROXY_AUDIENCE]}
    path = small_fs / "audit.log"
    audit = {"sink": "file", "file": str(path), "fail_closed": fail_closed}
    proxy = proxy_factory(proxy_config(slurm, [issuer], audit=audit), {"site.yaml": site_policy(oidc.issuer)})
    token = oidc.client_credentials_token("alice-cli")
    restd = RestdLog(slurm)
    assert call(proxy, "GET", f"{api}/ping", token=token, request_id=f"{request_id}-ok").status_code == 200
    mark, jobs_before = restd.mark(), {j["JobId"] for j in slurm.jobs()}

    filler = _fill(small_fs)
    body = job_body(api, slurm.job_dir("alice"))
    full = call(proxy, "POST", f"{api}/job/submit", token=token, request_id=f"{request_id}-full", json=body)
    filler.unlink()
    path.rename(small_fs / "audit.log.moved")
    path.mkdir()
    unopenable = call(proxy, "GET", f"{api}/ping", token=token, request_id=f"{request_id}-dir")
    path.rmdir()

    if fail_closed:
        for refused in (full, unopenable):
            assert refused.status_code == 503, refused.text
            assert refused.json()["slurmproxy"]["reason"] == "audit_unavailable"
        assert restd.since(mark) == []  # refused before slurmrestd saw anything
        assert {j["JobId"] for j in slurm.jobs()} == jobs_before
    else:
        assert full.status_code == 200 and unopenable.status_code == 200, (full.text, unopenable.text)
        slurm.wait_job(full.json()["job_id"])
    again = call(proxy, "GET", f"{api}/ping", token=token, request_id=f"{request_id}-again")
    assert again.status_code == 200, again.text
    assert [r["request_id"] for r in proxy.audit_records()] == [f"{request_id}-again"]
    moved = {json.loads(line)["request_id"] for line in (small_fs / "audit.log.moved").read_text().splitlines()}
    log = proxy.log_path.read_text()
    # tmpfs leaves the file's last page writable: the record of "full" may still have fitted there.
    assert f"{request_id}-ok" in moved and moved <= {f"{request_id}-ok", f"{request_id}-full"}
    if not fail_closed:  # nothing is lost: a record that could not be written is in the application log
        assert f"{request_id}-full" in moved or f"{request_id}-full" in log
        assert "audit.fail_closed is false" in log and f'"request_id":"{request_id}-dir"' in log
