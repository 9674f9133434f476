"""``slurmproxy audit``: query the audit log (the current file and its rotated files).

    slurmproxy audit --config /etc/slurmproxy/config.yaml --job-id 4711
    slurmproxy audit /var/log/slurmproxy/audit.log --since 24h --decision deny --format csv
    slurmproxy audit audit.log --vo vo.example.org --summary
    kubectl logs deploy/slurmproxy | slurmproxy audit - --user alice

Filters of different kinds must all match; repeating one (``--user a --user b``) matches either.
Exit status: 0, or 2 when the arguments, the configuration or a file cannot be used.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from slurmproxy.audit.query import Query, Reader, Record, Summary, audit_files, kind_of, settled
from slurmproxy.audit.record import read_pseudonym_key
from slurmproxy.commands import EXIT_CONFIG, EXIT_OK, add_config_argument
from slurmproxy.config.settings import load_settings
from slurmproxy.core.durations import parse_time
from slurmproxy.errors import ConfigError

FIELDS = [
    "time", "request_id", "decision", "status", "reason", "issuer", "subject", "vo", "vos", "entitlement", "rule",
    "operation", "mapping", "local_user", "mapping_detail", "method", "path", "job_id", "upstream_status", "client",
    "peer", "user_agent", "detail", "latency_ms", "upstream_ms", "served_from", "kind", "schema",
]  # fmt: skip
"""CSV columns: every field of the record schema (docs/audit.schema.json; a test keeps them equal)."""
TABLE = [
    ("TIME", "time", 19), ("DECISION", "decision", 8), ("STATUS", "status", 6), ("SUBJECT", "subject", 36),
    ("USER", "local_user", 16), ("VO", "vo", 24), ("RULE", "rule", 24), ("METHOD", "method", 6),
    ("PATH", "path", 48), ("JOB", "job_id", 10), ("REQUEST_ID", "request_id", 36),
]  # fmt: skip


class UsageError(Exception):
    pass


def _cell(record: Record, name: str, width: int) -> str:
    value = record.get(name)
    if name == "decision" and kind_of(record) == "intent":
        value = "intent"  # forwarded, no outcome recorded: slurmrestd may have acted
    text = "-" if value is None else (" ".join(value) if isinstance(value, list) else str(value))
    if name == "time":
        text = text[:19].replace("T", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def write_table(records: Iterable[Record], out: TextIO) -> int:
    rows = [[_cell(r, name, width) for _, name, width in TABLE] for r in records]
    header = [title for title, _, _ in TABLE]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]
    for row in [header, *rows]:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")
    return len(rows)


def write_json(records: Iterable[Record], out: TextIO) -> int:
    count = 0
    for record in records:
        out.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
        count += 1
    return count


def csv_value(value: Any) -> Any:
    """A cell: nested objects as JSON, lists joined with ``;``, null as empty."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return ";".join(str(v) for v in value) if isinstance(value, list) else value


def write_csv(records: Iterable[Record], out: TextIO) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)
    count = 0
    for record in records:
        writer.writerow([csv_value(record.get(name)) for name in FIELDS])
        count += 1
    return count


def write_summary(summary: Summary, fmt: str, out: TextIO) -> None:
    data = summary.as_dict()
    if fmt == "json":
        out.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
        return
    by = {key.removeprefix("by_"): value for key, value in data.items() if key.startswith("by_")}
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["dimension", "value", "count"])
        writer.writerow(["total", "", summary.total])
        for dimension, counts in by.items():
            writer.writerows([dimension, value, count] for value, count in counts.items())
        return
    out.write(f"requests: {summary.total}")
    out.write(f"  ({summary.first} to {summary.last})\n" if summary.total else "\n")
    for dimension, counts in by.items():
        out.write(f"\nby {dimension.replace('_', ' ')}:\n")
        width = max((len(v) for v in counts), default=0)
        out.writelines(f"  {value.ljust(width)}  {count:>8}\n" for value, count in counts.items())


def _query(args: argparse.Namespace, key: bytes | None) -> Query:
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return Query(
        since=since,
        until=until,
        subjects=set(args.subject or ()),
        issuers=set(args.issuer or ()),
        users=set(args.user or ()),
        vos=set(args.vo or ()),
        decisions=set(args.decision or ()),
        job_ids=set(args.job_id or ()),
        rules=set(args.rule or ()),
        statuses=set(args.status or ()),
        operations=set(args.operation or ()),
        request_ids=set(args.request_id or ()),
        pseudonym_key=key,
    )


def _sources(args: argparse.Namespace) -> tuple[list[Path], bytes | None]:
    files: list[Path] = list(args.files)
    key_file: Path | None = args.pseudonym_key_file
    if args.config is not None and (not files or key_file is None):
        settings = load_settings(args.config)
        if not files:
            if settings.audit.sink != "file" or settings.audit.file is None:
                raise UsageError(f"{args.config}: audit.sink is {settings.audit.sink!r}; name the file(s) to read")
            files = [settings.audit.file]
        key_file = key_file or settings.audit.pseudonym_key_file
    if not files:
        raise UsageError("name the audit file(s) to read, '-' for standard input, or give --config")
    return files, read_pseudonym_key(key_file) if key_file is not None else None


def run(args: argparse.Namespace) -> int:
    try:
        files, key = _sources(args)
        query = _query(args, key)
        paths = audit_files(files)
    except (UsageError, FileNotFoundError) as exc:
        print(f"slurmproxy audit: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        print(f"slurmproxy audit: {exc.detail}", file=sys.stderr)
        return EXIT_CONFIG
    reader = Reader()
    read = reader.records(paths)
    matching = (r for r in (read if args.raw else settled(read)) if query.matches(r))
    out: TextIO = sys.stdout
    try:
        if args.summary:
            summary = Summary()
            for record in matching:
                summary.add(record)
            write_summary(summary, args.format, out)
        else:
            writers: dict[str, Any] = {"table": write_table, "json": write_json, "csv": write_csv}
            writers[args.format](matching, out)
    except OSError as exc:
        print(f"slurmproxy audit: cannot read: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if reader.skipped:
        print(f"slurmproxy audit: skipped {reader.skipped} line(s) that are not audit records", file=sys.stderr)
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "audit",
        help="query the audit log",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Times: ISO 8601 (naive is UTC), or back from now: 90s, 30m, 12h, 7d, 2w.",
    )
    parser.add_argument("files", nargs="*", type=Path, help="audit files ('-': standard input); default: audit.file")
    add_config_argument(parser)
    f = parser.add_argument_group("filters")
    f.add_argument("--since", help="records at or after this time")
    f.add_argument("--until", help="records before this time")
    f.add_argument("--subject", action="append", help="the token's subject (matches pseudonyms with the key)")
    f.add_argument("--issuer", action="append", help="the token's issuer")
    f.add_argument("--user", action="append", help="the local account")
    f.add_argument("--vo", action="append", help="the VO that admitted the request, or any VO the caller is in")
    f.add_argument("--decision", action="append", choices=["allow", "deny", "error"])
    f.add_argument("--job-id", action="append", type=int, help="the job submitted, or named by the path")
    f.add_argument("--rule", action="append", help="the rule that allowed the request")
    f.add_argument("--status", action="append", type=int, help="the HTTP status the client got")
    f.add_argument("--operation", action="append", help="the operation group (submit, read-only, ...)")
    f.add_argument("--request-id", action="append", help="the request id")
    parser.add_argument("--pseudonym-key-file", type=Path, help="key to match --subject against pseudonyms")
    parser.add_argument("--format", choices=["table", "json", "csv"], default="table", help="default: table")
    parser.add_argument("--summary", action="store_true", help="counts per decision, status, VO, subject, user, rule")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="every record as written: a state-changing request's intent and outcome both (default: the outcome, "
        "or the intent if no outcome was written)",
    )
    parser.set_defaults(run=run)
