"""Load policy files into a :class:`Policy`, or fail with every error, each naming file, rule and field."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from slurmproxy.core.entitlements import EntitlementRequirement, requirement_from_string
from slurmproxy.errors import PolicyError
from slurmproxy.policy.checks import (
    check_issuers,
    check_rule_issuers,
    compile_job,
    digest_of,
    shared_account_warnings,
    warnings_for,
)
from slurmproxy.policy.model import (
    AliseMap,
    EntitlementSpec,
    OperationSpec,
    PolicyFile,
    PoolMap,
    RuleSpec,
    ServiceAccountMap,
    TableFile,
    TableSpec,
)
from slurmproxy.policy.operations import Operation, builtin_operations, operation
from slurmproxy.policy.rules import MappingStep, Policy, Rule

POLICY_SUFFIXES = (".yaml", ".yml")


def policy_files(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in POLICY_SUFFIXES and p.is_file()))
        else:
            files.append(path)
    return files


def _where(raw: Any, loc: Sequence[int | str]) -> str:
    out: list[str] = []
    node: Any = raw
    for part in loc:
        if isinstance(part, int):
            label = f"[{part}]"
            if isinstance(node, list) and part < len(node):
                node = node[part]
                if isinstance(node, dict) and isinstance(node.get("id"), str) and out and out[-1] == "rules":
                    label += f" (id={node['id']})"
            out.append(label)
        else:
            node = node.get(part) if isinstance(node, dict) else None
            out.append(("." if out else "") + str(part))
    return "".join(out) or "(top level)"


def _read_yaml(path: Path, errors: list[str]) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        errors.append(f"{path}: cannot read: {exc.strerror}")
    except yaml.YAMLError as exc:
        errors.append(f"{path}: not valid YAML: {exc}")
    return None


Indexed = tuple[PolicyFile, list[int]]  # a file and, for each of its rules, the rule's index in the file


def _validate_file(path: Path, raw: Any, errors: list[str]) -> Indexed | None:
    """The validated file. If only some rules are invalid, the others are kept too, so that their
    errors (unknown groups, tables...) are reported in the same run; the load fails either way."""
    try:
        document = PolicyFile.model_validate(raw if raw is not None else {})
        return document, list(range(len(document.rules)))
    except ValidationError as exc:
        problems = exc.errors()
        for err in problems:
            errors.append(f"{path}: {_where(raw, err['loc'])}: {err['msg']}")
    bad_rules = {err["loc"][1] for err in problems if len(err["loc"]) > 1 and err["loc"][0] == "rules"}
    if not isinstance(raw, dict) or not isinstance(raw.get("rules"), list):
        return None
    if any(err["loc"][:1] != ("rules",) or len(err["loc"]) < 2 for err in problems):
        return None
    kept = [n for n in range(len(raw["rules"])) if n not in bad_rules]
    try:
        salvaged = PolicyFile.model_validate({**raw, "rules": [raw["rules"][n] for n in kept]})
    except ValidationError:  # a rule that is only invalid next to another (none today): report what we have
        return None
    return salvaged, kept


def _table_references(path: Path, raw: Any) -> set[Path]:
    """Files a policy file names as mapping tables: they sit beside policies but are not policies."""
    refs: set[Path] = set()
    tables = raw.get("tables") if isinstance(raw, dict) else None
    if isinstance(tables, dict):
        for spec in tables.values():
            file = spec.get("file") if isinstance(spec, dict) else None
            if isinstance(file, str):
                refs.add((path.parent / file).resolve())
    return refs


def _read_table(
    spec: TableSpec, base: Path, name: str, source: Path, errors: list[str], inputs: list[Path]
) -> dict[tuple[str, str], str]:
    table: dict[tuple[str, str], str] = {}
    entries = list(spec.entries)
    if spec.file is not None:
        file = spec.file if spec.file.is_absolute() else base / spec.file
        inputs.append(file)
        if file.suffix == ".csv":
            try:
                with file.open(newline="", encoding="utf-8") as handle:
                    for n, row in enumerate(csv.DictReader(handle), start=2):
                        if not row.get("issuer") or not row.get("subject") or not row.get("user"):
                            errors.append(f"{file}: line {n}: needs issuer, subject and user")
                            continue
                        entries.append(TableFile.model_validate({"entries": [row]}).entries[0])
            except OSError as exc:
                errors.append(f"{source}: tables.{name}.file: cannot read {file}: {exc.strerror}")
        else:
            before = len(errors)
            raw = _read_yaml(file, errors)
            if len(errors) > before:
                return table
            try:
                entries.extend(TableFile.model_validate(raw or {}).entries)
            except ValidationError as exc:
                for err in exc.errors():
                    errors.append(f"{file}: {_where(raw, err['loc'])}: {err['msg']}")
    for entry in entries:
        key = (entry.issuer, entry.subject)
        if key in table and table[key] != entry.user:
            errors.append(f"{source}: tables.{name}: {entry.subject} from {entry.issuer} is mapped twice")
        table[key] = entry.user
    return table


def _requirement(spec: str | EntitlementSpec) -> EntitlementRequirement:
    if isinstance(spec, str):
        return requirement_from_string(spec)
    return EntitlementRequirement(
        namespace=spec.namespace.lower(),
        group=spec.group,
        subgroups=None if spec.subgroups == "any" else tuple(spec.subgroups),
        role=spec.role,
        authority=spec.authority.lower() if spec.authority else None,
    )


def _compile_rule(
    spec: RuleSpec,
    index: int,
    source: Path,
    groups: dict[str, tuple[Operation, ...]],
    tables: dict[str, Any],
    errors: list[str],
    file_issuers: list[str] | None = None,
) -> Rule | None:
    where = f"{source}: rules[{index}] (id={spec.id})"
    requirements: list[EntitlementRequirement] = []
    for n, ent in enumerate(spec.entitlements):
        try:
            requirements.append(_requirement(ent))
        except ValueError as exc:
            errors.append(f"{where}.entitlements[{n}]: {exc}")
    operations: list[Operation] = []
    for n, item in enumerate(spec.allow):
        if isinstance(item, OperationSpec):
            try:
                operations.append(operation(item.methods, item.path, f"{spec.id}#{n}"))
            except ValueError as exc:
                errors.append(f"{where}.allow[{n}]: {exc}")
        elif item in groups:
            operations.extend(groups[item])
        else:
            errors.append(f"{where}.allow[{n}]: unknown operation group {item!r} (known: {', '.join(sorted(groups))})")
    mapping: list[MappingStep] = []
    for n, step in enumerate(spec.mapping):
        if isinstance(step, ServiceAccountMap):
            mapping.append(MappingStep("service_account", step.service_account))
        elif isinstance(step, AliseMap):
            mapping.append(MappingStep("alise", step.alise))
        elif isinstance(step, PoolMap):
            mapping.append(MappingStep("pool", step.pool, step.max_leases))
        elif step.table not in tables:
            errors.append(f"{where}.mapping[{n}]: unknown table {step.table!r}")
        else:
            mapping.append(MappingStep("table", step.table))
    issuers = spec.issuers if spec.issuers is not None else file_issuers
    return Rule(
        id=spec.id,
        source=str(source),
        description=spec.description,
        issuers=frozenset(issuers) if issuers is not None else None,
        subjects=frozenset(spec.subjects) if spec.subjects is not None else None,
        requirements=tuple(requirements),
        allow=tuple(a if isinstance(a, str) else f"{','.join(a.methods)} {a.path}" for a in spec.allow),
        operations=tuple(operations),
        mapping=tuple(mapping),
        claims={name: tuple(values) for name, values in (spec.claims or {}).items()},
        job=compile_job(spec, where, errors),
        rate_limit=spec.rate_limit,
    )


def _load_shared(
    parsed: list[tuple[Path, PolicyFile]], errors: list[str], inputs: list[Path]
) -> tuple[dict[str, tuple[Operation, ...]], dict[str, dict[tuple[str, str], str]]]:
    """Operation groups (built-in plus every file's) and mapping tables, shared by all rules."""
    groups = builtin_operations()
    tables: dict[str, dict[tuple[str, str], str]] = {}
    for file, pf in parsed:
        for name, ops in pf.operations.items():
            if name in groups:
                errors.append(f"{file}: operations.{name}: the group is already defined")
                continue
            try:
                groups[name] = tuple(operation(o.methods, o.path, name) for o in ops)
            except ValueError as exc:
                errors.append(f"{file}: operations.{name}: {exc}")
        for name, table_spec in pf.tables.items():
            if name in tables:
                errors.append(f"{file}: tables.{name}: the table is already defined")
                continue
            tables[name] = _read_table(table_spec, file.parent, name, file, errors, inputs)
    return groups, tables


def _read_files(files: list[Path], errors: list[str]) -> list[tuple[Path, Indexed]]:
    raws: list[tuple[Path, Any]] = []
    for file in files:
        if not file.exists():
            errors.append(f"{file}: no such file")
            continue
        before = len(errors)
        raw = _read_yaml(file, errors)
        if len(errors) == before:
            raws.append((file, raw))
    table_files: set[Path] = set()
    for file, raw in raws:
        table_files |= _table_references(file, raw)
    parsed: list[tuple[Path, Indexed]] = []
    for file, raw in raws:
        if file.resolve() in table_files:
            continue
        policy_file = _validate_file(file, raw, errors)
        if policy_file is not None:
            parsed.append((file, policy_file))
    return parsed


def load_policy(paths: Iterable[Path], *, trusted_issuers: Iterable[str] | None = None) -> Policy:
    """Read, validate and compile every policy file; raise PolicyError listing all problems."""
    errors: list[str] = []
    files = policy_files(paths)
    if not files:
        raise PolicyError(["no policy files found (policy.paths)"])
    parsed = _read_files(files, errors)
    inputs: list[Path] = list(files)
    groups, tables = _load_shared([(file, pf) for file, (pf, _) in parsed], errors, inputs)
    rules: list[Rule] = []
    seen: dict[str, Path] = {}
    trusted = set(trusted_issuers) if trusted_issuers is not None else None
    for file, (pf, indexes) in parsed:
        check_issuers(file, pf, indexes, trusted, errors)
        for index, spec in zip(indexes, pf.rules, strict=True):
            if spec.id in seen:
                errors.append(f"{file}: rules[{index}] (id={spec.id}): id already used in {seen[spec.id]}")
            seen[spec.id] = file
            where = f"{file}: rules[{index}] (id={spec.id})"
            check_rule_issuers(spec, spec.issuers if spec.issuers is not None else pf.issuers, where, trusted, errors)
            rule = _compile_rule(spec, index, file, groups, tables, errors, pf.issuers)
            if rule is not None:
                rules.append(rule)
    if errors:
        raise PolicyError(errors)
    unique_inputs = tuple(dict.fromkeys(inputs))
    return Policy(
        rules=tuple(rules),
        tables={k: dict(v) for k, v in tables.items()},
        sources=tuple(str(f) for f in files),
        digest=digest_of(unique_inputs),
        inputs=tuple(str(f) for f in unique_inputs),
        warnings=(*(w for rule in rules for w in warnings_for(rule)), *shared_account_warnings(rules, trusted)),
    )
