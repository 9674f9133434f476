from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from slurmproxy.audit import (
    MAX_LINE_BYTES,
    SCHEMA,
    AuditLog,
    AuditRecord,
    AuditWriteError,
    pseudonym,
    read_pseudonym_key,
)
from slurmproxy.entitlements import parse_all
from slurmproxy.policy import Policy, evaluate, load_policy
from slurmproxy.settings import AuditSettings, ConfigError
from slurmproxy.tokens import Principal
from tests.helpers import ISSUER, OTHER_VO, VO_MEMBER, basic_policy, write_policy

ROOT = Path(__file__).resolve().parent.parent
AUDIT_SCHEMA = json.loads((ROOT / "docs" / "audit.schema.json").read_text())
KEY = b"0123456789abcdef-pseudonym-key"


def validate(record: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(AUDIT_SCHEMA, format_checker=jsonschema.FormatChecker()).validate(record)


def principal(subject: str = "alice@example.org", entitlements: tuple[str, ...] = (VO_MEMBER, OTHER_VO)) -> Principal:
    parsed = parse_all(entitlements).valid
    return Principal(ISSUER, subject, {}, entitlements, 0.0, "jti", parsed_entitlements=parsed)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return load_policy([write_policy(tmp_path_factory.mktemp("policy"), basic_policy())])


def line_of(record: AuditRecord, key: bytes | None = None) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(record.to_line(key))
    return data


def test_one_line_per_record_with_schema_and_latency(tmp_path: Path) -> None:
    log = AuditLog(AuditSettings(sink="file", file=tmp_path / "a" / "audit.log"))
    log.open()
    for n in range(3):
        log.emit(AuditRecord(request_id=f"r{n}", method="GET", path="/x", status=200, decision="allow"))
    log.close()
    lines = (tmp_path / "a" / "audit.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["request_id"] for r in records] == ["r0", "r1", "r2"]
    assert all(r["schema"] == SCHEMA and r["latency_ms"] >= 0 and r["time"].endswith("+00:00") for r in records)
    assert "started" not in records[0]
    assert log.records == 3


def test_the_json_schema_names_exactly_the_record_fields() -> None:
    fields = {f.name for f in dataclasses.fields(AuditRecord)} - {"started"}
    assert set(AUDIT_SCHEMA["properties"]) == fields | {"schema", "time"}
    assert set(AUDIT_SCHEMA["required"]) == set(AUDIT_SCHEMA["properties"])
    assert AUDIT_SCHEMA["properties"]["schema"]["const"] == SCHEMA


def allowed_record(policy: Policy) -> AuditRecord:
    path = "/slurm/v0.0.40/job/submit"
    record = AuditRecord(request_id="r-1", method="POST", path=path, client="192.0.2.7")
    record.set_principal(principal())
    record.set_decision(evaluate(policy, principal(), "POST", path))
    record.local_user, record.mapping = "alice", "table:users"
    record.decision, record.reason, record.status, record.upstream_status, record.job_id = (
        "allow",
        "allowed",
        200,
        200,
        7,
    )
    with record.upstream_timer():
        pass
    return record


def test_allowed_record_names_who_as_whom_what_and_which_rule(policy: Policy) -> None:
    data = line_of(allowed_record(policy))
    validate(data)
    assert data["vo"] == "vo.example.org" and data["entitlement"] == VO_MEMBER
    assert data["vos"] == ["vo.example.org", "vo.other.org"]
    assert data["rule"] == "members" and data["operation"] == "submit"
    assert data["local_user"] == "alice" and data["job_id"] == 7
    assert data["upstream_ms"] is not None and data["upstream_ms"] >= 0


@pytest.mark.parametrize(
    ("path", "job_id"),
    [
        pytest.param("/slurm/v0.0.38/job/42", 42, id="slurm-job"),
        pytest.param("/slurm/v0.0.41/job/42_3/", 42, id="array-task"),
        pytest.param("/slurmdb/v0.0.40/job/9", 9, id="accounting-job"),
        pytest.param("/slurm/v0.0.40/jobs", None, id="listing"),
        pytest.param("/slurm/v0.0.40/job/submit", None, id="submit-without-answer"),
    ],
)
def test_job_id_comes_from_the_path_when_no_submit_answer_gave_one(path: str, job_id: int | None) -> None:
    data = line_of(AuditRecord(request_id="r", method="DELETE", path=path, decision="deny", reason="x", status=403))
    validate(data)
    assert data["job_id"] == job_id


def test_denied_record_without_identity_is_valid() -> None:
    record = AuditRecord(request_id="r", method="GET", path="/", decision="deny", reason="missing_token", status=401)
    record.detail = "no bearer token"
    data = line_of(record)
    validate(data)
    assert data["subject"] is None and data["vos"] == [] and data["upstream_ms"] is None


def test_long_fields_are_shortened_to_keep_one_line_under_pipe_buf(policy: Policy) -> None:
    record = allowed_record(policy)
    record.user_agent = "u" * 5000
    record.detail = "d" * 5000
    record.entitlement = "urn:mace:egi.eu:group:" + "g" * 1000
    record.path = "/slurm/v0.0.40/" + "p" * 497
    record.vos = [f"vo{n}.{'x' * 200}" for n in range(16)]
    line = record.to_line()
    assert len(line) <= MAX_LINE_BYTES and line.endswith(b"\n") and line.count(b"\n") == 1
    validate(json.loads(line))


def test_pseudonymised_subject_is_a_keyed_hash_per_issuer(policy: Policy) -> None:
    data = line_of(allowed_record(policy), KEY)
    validate(data)
    assert data["subject"] == pseudonym(KEY, ISSUER, "alice@example.org")
    assert data["subject"].startswith("hmac:") and len(data["subject"]) == 5 + 32
    assert "alice@example.org" not in json.dumps(data)
    assert pseudonym(KEY, "https://other.example", "alice@example.org") != data["subject"]
    assert pseudonym(b"another key of 16+ bytes", ISSUER, "alice@example.org") != data["subject"]


def test_pseudonym_key_is_read_from_a_file_and_checked(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(KEY)
    assert read_pseudonym_key(key) == KEY
    key.write_bytes(b"s3cr3t")
    with pytest.raises(ConfigError, match="fewer than 16 bytes") as short:
        read_pseudonym_key(key)
    assert "s3cr3t" not in str(short.value)
    with pytest.raises(ConfigError, match="cannot read"):
        read_pseudonym_key(tmp_path / "missing")


def test_audit_log_pseudonymises_when_configured(tmp_path: Path, policy: Policy) -> None:
    (tmp_path / "key").write_bytes(KEY)
    log = AuditLog(AuditSettings(sink="file", file=tmp_path / "audit.log", pseudonym_key_file=tmp_path / "key"))
    log.open()
    log.emit(allowed_record(policy))
    log.close()
    (data,) = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert data["subject"] == pseudonym(KEY, ISSUER, "alice@example.org")


class Observer:
    def __init__(self) -> None:
        self.writes: list[bool] = []

    def audit_write(self, ok: bool) -> None:
        self.writes.append(ok)


def test_write_failure_raises_and_is_counted() -> None:
    observer = Observer()
    log = AuditLog(AuditSettings(sink="file", file=Path("/dev/full"), max_bytes=0), observer)
    log.open()
    with pytest.raises(AuditWriteError):
        log.emit(AuditRecord(request_id="r", method="GET", path="/"))
    assert log.failures == 1 and observer.writes == [False]
    log.close()


def test_write_failure_with_fail_open_logs_the_record_and_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    observer = Observer()
    log = AuditLog(AuditSettings(sink="file", file=Path("/dev/full"), max_bytes=0, fail_closed=False), observer)
    log.open()
    with caplog.at_level(logging.ERROR, logger="slurmproxy.audit"):
        log.emit(AuditRecord(request_id="kept-in-the-log", method="GET", path="/"))
    log.close()
    assert log.failures == 1 and log.records == 0 and observer.writes == [False]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "No space left on device" in message and '"request_id":"kept-in-the-log"' in message


def test_stdout_sink_writes_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    log = AuditLog(AuditSettings())
    log.open()
    log.emit(AuditRecord(request_id="to-stdout", method="GET", path="/"))
    log.close()
    out = capfd.readouterr().out
    assert out.count("\n") == 1 and json.loads(out)["request_id"] == "to-stdout"


def test_emit_before_open_fails() -> None:
    with pytest.raises(AuditWriteError):
        AuditLog(AuditSettings()).emit(AuditRecord(request_id="r", method="GET", path="/"))


def test_mapping_detail_is_recorded_and_its_subject_pseudonymised() -> None:
    lease = {"lease": "new", "pool": "vo", "account": "pool001", "leased_at": "2026-11-22T02:17:24+00:00"}
    record = AuditRecord(request_id="r", method="GET", path="/slurm/v0.0.40/ping", mapping="pool:vo")
    record.mapping_detail = lease
    validate(line_of(record))
    assert line_of(record)["mapping_detail"] == lease
    admin = AuditRecord(request_id="admin-1", method="ADMIN", path="mapping release", client="cli", issuer=ISSUER)
    admin.subject, admin.decision, admin.reason, admin.status = "alice@example.org", "allow", "lease_released", 200
    admin.mapping_detail = {"lease": "released", "issuer": ISSUER, "subject": "alice@example.org", "account": "p1"}
    data = line_of(admin, KEY)
    validate(data)
    assert data["mapping_detail"]["subject"] == data["subject"] == pseudonym(KEY, ISSUER, "alice@example.org")
    assert "alice@example.org" not in json.dumps(data)
    assert admin.mapping_detail["subject"] == "alice@example.org"  # the record itself is left as it was
