from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from slurmproxy.audit.log import AuditLog
from slurmproxy.audit.record import MAX_LINE_BYTES, SCHEMA, AuditRecord, pseudonym, read_pseudonym_key
from slurmproxy.config.settings import AuditSettings
from slurmproxy.core.entitlements import parse_all
from slurmproxy.core.principal import Principal
from slurmproxy.errors import (
    AuthenticationError,
    ConfigError,
    DependencyError,
    JobPolicyError,
    RuleRef,
    UpstreamAuthFailed,
)
from slurmproxy.policy import Policy, evaluate, load_policy
from slurmproxy.policy.authorize import ref_of
from tests.helpers import ISSUER, OTHER_VO, VO_MEMBER, basic_policy, write_policy

ROOT = Path(__file__).resolve().parents[2]
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


def test_the_json_schema_names_exactly_the_record_fields() -> None:
    fields = {f.name for f in dataclasses.fields(AuditRecord)} - {"started"}
    assert set(AUDIT_SCHEMA["properties"]) == fields | {"schema", "time"}
    assert set(AUDIT_SCHEMA["required"]) == set(AUDIT_SCHEMA["properties"])
    assert AUDIT_SCHEMA["properties"]["schema"]["const"] == SCHEMA


def allowed_record(policy: Policy) -> AuditRecord:
    path = "/slurm/v0.0.40/job/submit"
    record = AuditRecord(request_id="r-1", method="POST", path=path, client="192.0.2.7")
    record.set_principal(principal())
    record.set_rule(ref_of(evaluate(policy, principal(), "POST", path)))
    record.local_user, record.mapping = "alice", "table:users"
    record.allow(200)
    record.upstream_status, record.job_id = 200, 7
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


def test_begin_bounds_the_request_line_and_starts_as_an_internal_error() -> None:
    record = AuditRecord.begin("r", "GET", "/slurm/" + "x" * 600, client="192.0.2.1", user_agent="u" * 300)
    assert len(record.path) == 512 and record.user_agent == "u" * 256
    assert (record.decision, record.reason, record.status) == ("error", "internal_error", 500)
    assert (
        AuditRecord.begin("r", "-", "").path == "-"
        and AuditRecord.begin("r", "GET", "/", user_agent="").user_agent is None
    )


@pytest.mark.parametrize(
    ("error", "decision"),
    [
        pytest.param(AuthenticationError("expired", reason="token_expired"), "deny", id="401-deny"),
        pytest.param(DependencyError("down", reason="provider_unreachable"), "error", id="503-error"),
    ],
)
def test_refuse_is_a_denial_below_500_and_an_error_from_500(error: Exception, decision: str) -> None:
    record = AuditRecord.begin("r", "GET", "/slurm/v0.0.40/ping")
    assert isinstance(error, AuthenticationError | DependencyError)
    record.refuse(error)
    assert (record.decision, record.reason, record.detail, record.status) == (
        decision,
        error.reason,
        error.detail,
        error.status_code,
    )


def test_refuse_keeps_what_the_refusing_stage_had_decided() -> None:
    refused_body = JobPolicyError("job.partition", "partition 'gpu' is not allowed", reason="job_partition_not_allowed")
    refused_body.rule = RuleRef("members", "submit", VO_MEMBER)
    record = AuditRecord.begin("r", "POST", "/slurm/v0.0.40/job/submit")
    record.refuse(refused_body)
    assert (record.rule, record.operation, record.vo) == ("members", "submit", "vo.example.org")
    rejected = UpstreamAuthFailed("the proxy's credential was rejected")
    rejected.upstream_status = 511
    record.refuse(rejected)
    assert (record.upstream_status, record.status, record.decision) == (511, 502, "error")
    assert record.rule == "members"  # an error without a rule of its own keeps the one recorded


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
