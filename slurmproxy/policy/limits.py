"""Per-rule Slurm constraints on jobs (compiled from a rule's ``job:`` section) and Slurm time strings."""

from __future__ import annotations

import re
from dataclasses import dataclass

from slurmproxy.policy.model import JobSpec

_TIME = re.compile(r"(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?")
_SIZE = re.compile(r"(?P<number>[0-9]{1,15})(?P<unit>[KMGTkmgt]?)")
_UNIT_MB = {"k": 1 / 1024, "m": 1, "": 1, "g": 1024, "t": 1024 * 1024}
MAX_MINUTES = 365 * 24 * 60


def slurm_megabytes(value: int | str) -> int:
    """A memory size as Slurm writes it (``--mem``), in MB: ``1024``, ``"512M"``, ``"16G"``, ``"1T"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.fullmatch(str(value).strip())
    if match is None:
        raise ValueError(f"not a memory size: {value!r} (MB, or a number with K, M, G or T)")
    return int(-(-int(match["number"]) * _UNIT_MB[match["unit"].lower()] // 1))


def slurm_minutes(value: int | str) -> int:
    """Minutes in a time limit written as Slurm does (sbatch ``--time``), rounded up to whole minutes.

    ``90``, ``"90"`` (minutes), ``"90:30"`` (minutes:seconds), ``"1:30:00"`` (hours:minutes:seconds),
    ``"2-0"`` (days-hours), ``"2-12:00"`` (days-hours:minutes), ``"2-12:00:00"``.
    """
    if isinstance(value, bool):
        raise ValueError("a time limit must be minutes or a Slurm time string")
    if isinstance(value, int):
        minutes = value
    else:
        match = _TIME.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"not a Slurm time limit: {value!r} (minutes, or D-HH:MM:SS)")
        a, b, c = (int(match.group(k)) if match.group(k) is not None else None for k in ("a", "b", "c"))
        assert a is not None
        if match.group("days") is not None:
            days = int(match.group("days"))
            seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
        elif c is not None:
            seconds = a * 3600 + (b or 0) * 60 + c
        else:
            seconds = a * 60 + (b or 0)
        minutes = -(-seconds // 60)
    if minutes < 1 or minutes > MAX_MINUTES:
        raise ValueError(f"a time limit must be between 1 minute and {MAX_MINUTES // 1440} days, got {value!r}")
    return minutes


@dataclass(frozen=True)
class JobLimits:
    """What a job may ask for. ``None`` means the proxy does not restrict that value."""

    accounts: frozenset[str] | None = None
    default_account: str | None = None
    partitions: frozenset[str] | None = None
    default_partition: str | None = None
    qos: frozenset[str] | None = None
    default_qos: str | None = None
    max_minutes: int | None = None
    default_minutes: int | None = None
    max_nodes: int | None = None
    max_cpus: int | None = None
    max_gpus: int | None = None
    max_memory_mb: int | None = None
    default_memory_mb: int | None = None
    max_array_tasks: int | None = None
    extra_fields: frozenset[str] = frozenset()

    def describe(self) -> dict[str, object]:
        """The limits as plain data (for ``explain``, ``whoami`` and ``policy check``)."""
        out: dict[str, object] = {}
        for name in ("accounts", "partitions", "qos"):
            values = getattr(self, name)
            if values is not None:
                out[name] = sorted(values)
        for name in (
            "default_account",
            "default_partition",
            "default_qos",
            "max_nodes",
            "max_cpus",
            "max_gpus",
            "max_memory_mb",
            "default_memory_mb",
            "max_array_tasks",
        ):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.max_minutes is not None:
            out["max_time_minutes"] = self.max_minutes
        if self.default_minutes is not None:
            out["default_time_minutes"] = self.default_minutes
        if self.extra_fields:
            out["extra_fields"] = sorted(self.extra_fields)
        return out


def _default(values: list[str] | None, default: str | None) -> str | None:
    if default is not None:
        return default
    return values[0] if values else None


def _memory_limits(spec: JobSpec, errors: list[str]) -> tuple[int | None, int | None]:
    memory: dict[str, int | None] = {"max_memory": None, "default_memory": None}
    for name in memory:
        raw_size = getattr(spec, name)
        if raw_size is None:
            continue
        try:
            memory[name] = slurm_megabytes(raw_size)
        except ValueError as exc:
            errors.append(f"{name}: {exc}")
            continue
        if memory[name] == 0:
            errors.append(f"{name}: 0 would mean all the memory of each node to Slurm")
    max_memory, default_memory = memory["max_memory"], memory["default_memory"]
    if default_memory and not max_memory:
        errors.append("default_memory: only with max_memory (without it Slurm's own default applies)")
    if max_memory and default_memory and default_memory > max_memory:
        errors.append(f"default_memory: {spec.default_memory!r} is more than max_memory {spec.max_memory!r}")
    return max_memory, default_memory


def compile_limits(spec: JobSpec, forbidden: frozenset[str], known: frozenset[str]) -> tuple[JobLimits, list[str]]:
    """The compiled limits and a list of ``field: message`` errors (empty when valid).

    ``forbidden`` are fields no policy may allow (``user_id``, ``group_id``); ``known`` are the
    fields the built-in allow-list already has.
    """
    errors: list[str] = []
    max_minutes = default_minutes = None
    for name, raw in (("max_time", spec.max_time), ("default_time", spec.default_time)):
        if raw is None:
            continue
        try:
            minutes = slurm_minutes(raw)
        except ValueError as exc:
            errors.append(f"{name}: {exc}")
            continue
        if name == "max_time":
            max_minutes = minutes
        else:
            default_minutes = minutes
    if max_minutes is not None and default_minutes is not None and default_minutes > max_minutes:
        errors.append(f"default_time: {spec.default_time!r} is longer than max_time {spec.max_time!r}")
    max_memory, default_memory = _memory_limits(spec, errors)
    for n, name in enumerate(spec.extra_fields):
        if name in forbidden:
            errors.append(f"extra_fields[{n}]: {name!r} can never be allowed (the proxy decides who runs the job)")
        elif name in known:
            errors.append(f"extra_fields[{n}]: {name!r} is already allowed")
        elif not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name):
            errors.append(f"extra_fields[{n}]: not a job field name: {name!r}")
    limits = JobLimits(
        accounts=frozenset(spec.accounts) if spec.accounts is not None else None,
        default_account=_default(spec.accounts, spec.default_account),
        partitions=frozenset(spec.partitions) if spec.partitions is not None else None,
        default_partition=_default(spec.partitions, spec.default_partition),
        qos=frozenset(spec.qos) if spec.qos is not None else None,
        default_qos=_default(spec.qos, spec.default_qos),
        max_minutes=max_minutes,
        default_minutes=default_minutes if default_minutes is not None else max_minutes,
        max_nodes=spec.max_nodes,
        max_cpus=spec.max_cpus,
        max_gpus=spec.max_gpus,
        max_memory_mb=max_memory or None,
        default_memory_mb=default_memory or None,
        max_array_tasks=spec.max_array_tasks,
        extra_fields=frozenset(spec.extra_fields),
    )
    return limits, errors
