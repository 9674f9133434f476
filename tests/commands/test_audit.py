"""``slurmproxy audit`` on a generated log, written by the real audit writer with size rotation."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from slurmproxy.audit.file import AuditFile, rotated_files
from slurmproxy.audit.record import AuditRecord, pseudonym
from slurmproxy.cli import EXIT_CONFIG, main

BASE = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
ISS = "https://aai.egi.eu/auth/realms/egi"
EXAMPLE = "urn:mace:egi.eu:group:vo.example.org:role=member#aai.egi.eu"
OTHER = "urn:mace:egi.eu:group:vo.other.org:role=member#aai.egi.eu"
KINDS = 5
COUNT = 120  # 24 of each kind, one a minute from BASE
KEY = b"an audit pseudonym key, 32 bytes"


def record(i: int) -> AuditRecord:
    kind = i % KINDS
    api = "/slurm/v0.0.40"
    if kind == 0:  # alice submits job 1000+i
        r = AuditRecord(f"req-{i}", "POST", f"{api}/job/submit", issuer=ISS, subject="alice", vo="vo.example.org")
        r.vos, r.entitlement, r.rule, r.operation = ["vo.example.org"], EXAMPLE, "vo-example-members", "submit"
        r.mapping, r.local_user, r.job_id = "table:users", "alice", 1000 + i
    elif kind == 1:  # bob lists jobs
        r = AuditRecord(f"req-{i}", "GET", f"{api}/jobs", issuer=ISS, subject="bob", vo="vo.other.org")
        r.vos, r.entitlement, r.rule, r.operation = ["vo.other.org"], OTHER, "vo-other-members", "read-only"
        r.mapping, r.local_user = "service_account:svc-beta", "svc-beta"
    elif kind == 2:  # dave has no entitlement
        r = AuditRecord(f"req-{i}", "POST", f"{api}/job/submit", issuer=ISS, subject="dave")
        r.decision, r.reason, r.status, r.detail = "deny", "no_rule_matches", 403, "no rule admits this identity"
        return r
    elif kind == 3:  # no token at all
        return AuditRecord(f"req-{i}", "GET", f"{api}/ping", decision="deny", reason="missing_token", status=401)
    else:  # alice cancels the job she submitted four minutes ago; slurmrestd is down
        r = AuditRecord(f"req-{i}", "DELETE", f"{api}/job/{1000 + i - 4}", issuer=ISS, subject="alice")
        r.vo, r.vos = "vo.example.org", ["vo.example.org", "vo.other.org"]
        r.rule, r.operation = "vo-example-members", "cancel-own"
        r.mapping, r.local_user = "table:users", "alice"
        r.decision, r.reason, r.status = "error", "upstream_unreachable", 502
        return r
    r.decision, r.reason, r.status, r.upstream_status = "allow", "allowed", 200, 200
    return r


def write_log(path: Path, key: bytes | None = None, max_bytes: int = 6000) -> None:
    sink = AuditFile(path, max_bytes=max_bytes)
    sink.open()
    for i in range(COUNT):
        data = record(i).data(key)
        data["time"] = (BASE + timedelta(minutes=i)).isoformat(timespec="milliseconds")
        sink.write(json.dumps(data, separators=(",", ":")).encode() + b"\n")
    sink.close()


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.log"
    write_log(path)
    assert len(rotated_files(path)) >= 4  # the generated log really is spread over rotated files
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    status = main(["audit", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def json_lines(capsys: pytest.CaptureFixture[str], *args: str | Path) -> list[dict[str, Any]]:
    status, out, err = run(capsys, *args, "--format", "json")
    assert status == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_reads_every_record_of_the_current_and_rotated_files_in_order(
    log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = json_lines(capsys, log)
    assert [r["request_id"] for r in records] == [f"req-{i}" for i in range(COUNT)]


def test_who_submitted_job_n_as_which_account_under_which_rule(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, log, "--job-id", "1050")
    assert status == 0
    header, submit, cancel = out.splitlines()
    assert header.split()[:6] == ["TIME", "DECISION", "STATUS", "SUBJECT", "USER", "VO"]
    assert submit.split()[:9] == [
        "2026-11-20", "08:50:00", "allow", "200", "alice", "alice", "vo.example.org", "vo-example-members", "POST",
    ]  # fmt: skip
    assert "/job/submit" in submit and "1050" in submit and "req-50" in submit
    assert cancel.split()[2:4] == ["error", "502"] and "DELETE" in cancel and "/job/1050" in cancel


@pytest.mark.parametrize(
    ("args", "ids"),
    [
        pytest.param(["--decision", "deny"], [i for i in range(COUNT) if i % KINDS in (2, 3)], id="decision"),
        pytest.param(["--vo", "vo.other.org"], [i for i in range(COUNT) if i % KINDS in (1, 4)], id="vo-or-member"),
        pytest.param(["--user", "svc-beta"], [i for i in range(COUNT) if i % KINDS == 1], id="local-user"),
        pytest.param(["--subject", "alice", "--decision", "allow"], list(range(0, COUNT, KINDS)), id="subject"),
        pytest.param(
            ["--since", "2026-11-20T09:00", "--until", "2026-11-20T09:05:00+00:00"],
            [60, 61, 62, 63, 64],
            id="time-range",
        ),  # fmt: skip
        pytest.param(["--since", "2026-11-20T09:58Z"], [118, 119], id="since-utc"),
        pytest.param(["--status", "401", "--status", "403", "--until", "2026-11-20T08:04"], [2, 3], id="statuses"),
        pytest.param(["--rule", "vo-other-members", "--since", "2026-11-20T09:55"], [116], id="rule"),
        pytest.param(["--operation", "cancel-own", "--job-id", "1000"], [4], id="operation"),
        pytest.param(["--request-id", "req-7", "--request-id", "req-8"], [7, 8], id="request-ids"),
        pytest.param(["--issuer", "https://elsewhere.example", "--decision", "allow"], [], id="nothing"),
    ],
)
def test_filters(log: Path, capsys: pytest.CaptureFixture[str], args: list[str], ids: list[int]) -> None:
    assert [r["request_id"] for r in json_lines(capsys, log, *args)] == [f"req-{i}" for i in ids]


def test_relative_times_count_back_from_now(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.log"
    path.write_text(
        "".join(
            json.dumps({**record(0).data(), "request_id": f"r{n}", "time": t.isoformat()}) + "\n"
            for n, t in enumerate([datetime.now(UTC) - timedelta(hours=3), datetime.now(UTC) - timedelta(minutes=5)])
        )
    )
    assert [r["request_id"] for r in json_lines(capsys, path, "--since", "1h")] == ["r1"]
    assert [r["request_id"] for r in json_lines(capsys, path, "--until", "2h")] == ["r0"]


def test_csv_has_every_field(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, log, "--format", "csv", "--request-id", "req-4")
    assert status == 0
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["subject"] == "alice" and row["job_id"] == "1000" and row["vos"] == "vo.example.org;vo.other.org"
    assert row["upstream_status"] == "" and row["decision"] == "error" and row["schema"] == "slurmproxy.audit/1"


def test_csv_columns_are_the_record_schema_and_nested_fields_are_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = json.loads((Path(__file__).resolve().parents[2] / "docs" / "audit.schema.json").read_text())
    record = AuditRecord.begin("lease-1", "ADMIN", "mapping leases release")
    record.mapping_detail = {"lease": "released", "pool": "vo", "account": "pool001"}
    record.served_from = "cache"
    path = tmp_path / "audit.log"
    path.write_bytes(record.to_line())
    status, out, _ = run(capsys, path, "--format", "csv")
    assert status == 0
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert set(row) == set(schema["properties"])
    assert json.loads(row["mapping_detail"]) == record.mapping_detail
    assert row["served_from"] == "cache"


def test_summary_counts_per_vo_user_decision_and_status(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, log, "--summary", "--format", "json")
    assert status == 0
    summary = json.loads(out)
    assert summary["total"] == COUNT
    assert summary["first"].startswith("2026-11-20T08:00") and summary["last"].startswith("2026-11-20T09:59")
    assert summary["by_decision"] == {"allow": 48, "deny": 48, "error": 24}
    assert summary["by_status"] == {"200": 48, "403": 24, "401": 24, "502": 24}
    assert summary["by_vo"] == {"vo.example.org": 48, "-": 48, "vo.other.org": 24}
    assert summary["by_local_user"] == {"alice": 48, "-": 48, "svc-beta": 24}
    assert summary["by_subject"][f"alice ({ISS})"] == 48 and summary["by_subject"]["-"] == 24
    assert summary["by_reason"]["missing_token"] == 24


def test_summary_as_table_and_csv(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, log, "--summary", "--vo", "vo.other.org")
    assert status == 0
    assert out.startswith("requests: 48  (2026-11-20T08:01:00.000+00:00 to 2026-11-20T09:59:00.000+00:00)")
    sections = {part.split(":\n")[0]: [line.split() for line in part.split(":\n")[1].splitlines()] for part in
                out.split("\n\n")[1:]}  # fmt: skip
    assert sections["by decision"] == [["allow", "24"], ["error", "24"]]
    assert sections["by vo"] == [["vo.other.org", "24"], ["vo.example.org", "24"]]
    status, out, _ = run(capsys, log, "--summary", "--format", "csv", "--user", "svc-beta")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["dimension", "value", "count"] and ["total", "", "24"] in rows
    assert ["rule", "vo-other-members", "24"] in rows


def test_compressed_rotated_files_and_stray_lines(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    oldest = rotated_files(log)[0]
    with gzip.open(oldest.with_name(oldest.name + ".gz"), "wb") as gz:
        gz.write(oldest.read_bytes())
    oldest.unlink()
    with log.open("a") as f:
        f.write('INFO uvicorn: Application startup complete.\n{"torn": \n\n')
    status, out, err = run(capsys, log, "--format", "json")
    assert status == 0 and len(out.splitlines()) == COUNT
    assert "skipped 2 line(s)" in err


def test_reads_standard_input(log: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    text = "".join(f.read_text() for f in [*rotated_files(log), log])
    monkeypatch.setattr("sys.stdin", io.StringIO("app log line\n" + text))
    assert len(json_lines(capsys, "-", "--decision", "error")) == 24


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "key").write_bytes(KEY)
    (tmp_path / "jwt.key").write_bytes(b"k" * 32)
    data = {
        "upstream": {"url": "http://127.0.0.1:6820", "jwt_key_file": "jwt.key"},
        "audit": {"sink": "file", "file": "logs/audit.log", "pseudonym_key_file": "key"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    write_log(tmp_path / "logs" / "audit.log", key=KEY)
    yield path


def test_config_names_the_file_and_the_pseudonym_key(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = json_lines(capsys, "--config", config, "--subject", "alice", "--operation", "submit")
    assert len(records) == 24
    assert {r["subject"] for r in records} == {pseudonym(KEY, ISS, "alice")}
    status, out, _ = run(capsys, config.parent / "logs" / "audit.log", "--subject", "alice")
    assert status == 0 and out.splitlines()[1:] == []  # without the key a pseudonym matches nothing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["missing.log"], "missing.log: no such file", id="missing-file"),
        pytest.param([], "name the audit file(s)", id="nothing-to-read"),
        pytest.param(["-", "--since", "yesterday"], "not a time: 'yesterday'", id="bad-time"),
        pytest.param(["-", "--pseudonym-key-file", "nokey"], "cannot read", id="missing-key"),
    ],
)
def test_usage_errors_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    status, _, err = run(capsys, *args)
    assert status == EXIT_CONFIG and message in err


def test_config_with_stdout_sink_needs_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "jwt.key").write_bytes(b"k" * 32)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"upstream": {"url": "http://127.0.0.1:6820", "jwt_key_file": "jwt.key"}}))
    status, _, err = run(capsys, "--config", path)
    assert status == EXIT_CONFIG and "audit.sink is 'stdout'" in err


def test_a_state_changing_request_shows_once_and_an_unanswered_intent_stands_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15, item 10: intent and outcome records are one request to an auditor; an intent without an
    outcome (the proxy stopped, or the outcome went to the application log) is listed as such."""
    path = tmp_path / "audit.log"
    lines: list[AuditRecord] = []
    for n, job in ((1, 4711), (2, None), (3, 4713)):
        r = AuditRecord(f"req-{n}", "POST", "/slurm/v0.0.40/job/submit", issuer=ISS, subject="alice")
        r.rule, r.operation, r.local_user = "vo-example-members", "submit", "alice"
        lines.append(r.intent())
        if job is not None:  # req-2's outcome was never written
            r.kind, r.job_id = "outcome", job
            r.allow(200)
            lines.append(r)
    lines.append(
        AuditRecord("req-4", "GET", "/slurm/v0.0.40/jobs", decision="deny", reason="missing_token", status=401)
    )
    path.write_text("".join(r.to_line().decode() for r in lines))
    settled = json_lines(capsys, path)
    assert [(r["request_id"], r["kind"], r["status"]) for r in settled] == [
        ("req-1", "outcome", 200),
        ("req-3", "outcome", 200),
        ("req-4", "request", 401),
        ("req-2", "intent", None),
    ]
    assert len(json_lines(capsys, path, "--raw")) == 6
    status, table, _ = run(capsys, path)
    assert status == 0
    (unanswered,) = [line for line in table.splitlines() if "req-2" in line]
    assert unanswered.split()[2] == "intent"  # the DECISION column
    _, summary, _ = run(capsys, path, "--summary", "--format", "json")
    assert json.loads(summary)["by_kind"] == {"outcome": 2, "request": 1, "intent": 1}
    assert json_lines(capsys, path, "--job-id", "4713")[0]["request_id"] == "req-3"


def test_records_written_before_kinds_existed_read_as_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.log"
    old = AuditRecord("old-1", "POST", "/slurm/v0.0.40/job/submit", decision="allow", reason="allowed", status=200)
    data = old.data()
    del data["kind"]
    path.write_text(json.dumps(data) + "\n")
    (record,) = json_lines(capsys, path)
    assert record["request_id"] == "old-1" and "kind" not in record
    _, summary, _ = run(capsys, path, "--summary", "--format", "json")
    assert json.loads(summary)["by_kind"] == {"request": 1}
