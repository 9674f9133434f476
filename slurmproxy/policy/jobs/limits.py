"""One rule's job constraints applied to a parsed body: refuse what is not allowed, fill defaults.

For every job description in the body (``job``, each of ``jobs[]``/``hetjob[]``, or the whole
body of an update):

1. every field must be on the built-in allow-list for the body's dialect or in the rule's
   ``job.extra_fields``;
2. ``account``, ``partition`` (each of a comma-separated list) and ``qos``, when the rule lists
   allowed values, must be one of them; a submission that names none gets the default;
3. ``time_limit`` and ``time_minimum`` must not exceed ``max_time``; a submission without a
   time limit gets ``default_time`` (or ``max_time``); an infinite limit is refused when
   ``max_time`` is set;
4. the most nodes the job may get must not exceed ``max_nodes``; a submission that sets no upper
   bound gets one (``max_nodes``, less what its other components of a heterogeneous job take),
   so that Slurm cannot spread it over more nodes;
5. the CPUs it asks for (tasks × cpus_per_task, or more where ``minimum_cpus``,
   ``tasks_per_node`` or ``minimum_cpus_per_node`` say so) must not exceed ``max_cpus``.

Nodes and CPUs of a heterogeneous job are summed over its components. Updates are checked the
same way, but nothing is filled in. The input is never modified: a new document is returned.
"""

from __future__ import annotations

from typing import Any

from slurmproxy.errors import JobPolicyError
from slurmproxy.policy.jobs.body import JobBody, locate
from slurmproxy.policy.jobs.fields import FIELDS
from slurmproxy.policy.limits import JobLimits

NO_LIMITS = JobLimits()
INFINITE = -1


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _minutes(value: Any) -> int | None:
    """Minutes in a time value of either dialect; None if unset, INFINITE if infinite."""
    if isinstance(value, int):
        return value
    if value.get("infinite", False):
        return INFINITE
    if not value.get("set", "number" in value) or "number" not in value:
        return None
    number: int = value["number"]
    return number


def _time(limits: JobLimits, job: JobBody, where: str, component: dict[str, Any], fill: bool) -> None:
    for key in ("time_limit", "time_minimum"):
        minutes = _minutes(component[key]) if key in component else None
        if minutes is None:
            continue
        if limits.max_minutes is not None and (minutes == INFINITE or minutes > limits.max_minutes):
            asked = "infinite" if minutes == INFINITE else f"{minutes} minutes"
            raise JobPolicyError(
                _name(where, key),
                f"{_name(where, key)} {asked} is longer than allowed ({limits.max_minutes} minutes)",
                reason="job_time_limit_exceeded",
            )
    unset = "time_limit" not in component or _minutes(component["time_limit"]) is None
    if fill and unset and limits.default_minutes is not None:
        number = limits.default_minutes
        component["time_limit"] = (
            number if job.dialect == "legacy" else {"set": True, "infinite": False, "number": number}
        )


def _node_bounds(component: dict[str, Any]) -> tuple[int | None, int]:
    """(the most nodes the job description allows, or None if it sets no upper bound; the fewest it needs)."""
    counts: list[int] = []
    nodes = component.get("nodes")
    if isinstance(nodes, list):  # legacy [min] or [min, max]
        counts.extend(nodes)
    elif isinstance(nodes, int) and not isinstance(nodes, bool):
        counts.append(nodes)
    elif isinstance(nodes, str):  # "2", "1-4", "1,4,8"
        counts.extend(int(n) for part in nodes.split(",") for n in part.split("-"))
    fewest = min(counts, default=1)
    minimum = component.get("minimum_nodes")
    if isinstance(minimum, int) and not isinstance(minimum, bool):
        fewest = max(fewest, minimum)
    if "maximum_nodes" in component:
        counts.append(component["maximum_nodes"])
    return (max(counts) if counts else None), fewest


def _cpus(component: dict[str, Any], nodes: int) -> int:
    per_task = component.get("cpus_per_task", 1) or 1
    cpus: int = component.get("tasks", 1) * per_task
    if "tasks_per_node" in component:
        cpus = max(cpus, component["tasks_per_node"] * nodes * per_task)
    cpus = max(cpus, component.get("minimum_cpus", 0), component.get("maximum_cpus", 0))
    return int(max(cpus, component.get("minimum_cpus_per_node", 0) * nodes))


def _choice(limits: JobLimits, where: str, component: dict[str, Any], key: str, fill: bool) -> None:
    allowed: frozenset[str] | None = getattr(limits, "qos" if key == "qos" else f"{key}s")
    default: str | None = getattr(limits, f"default_{key}")
    if key not in component:
        if fill and default is not None:
            component[key] = default
        return
    values = component[key].split(",") if key == "partition" else [component[key]]
    for value in values:
        if allowed is not None and value not in allowed:
            name = _name(where, key)
            raise JobPolicyError(
                name,
                f"{name} {value!r} is not allowed (allowed: {', '.join(sorted(allowed))})",
                reason=f"job_{key}_not_allowed",
            )


def _fields(limits: JobLimits, job: JobBody, where: str, component: dict[str, Any]) -> None:
    known = FIELDS[job.dialect]
    for key in component:
        if key not in known and key not in limits.extra_fields:
            name = _name(where, key)
            raise JobPolicyError(name, f"{name} is not a job field this proxy allows")


def _fill_nodes(job: JobBody, component: dict[str, Any], fewest: int, most: int) -> None:
    if job.dialect == "legacy":
        component["nodes"] = [fewest, most]
    else:
        component["maximum_nodes"] = most


def _node_counts(
    limits: JobLimits, job: JobBody, components: list[tuple[str, dict[str, Any]]], fill: bool
) -> list[int]:
    """The most nodes each job description may get. When the rule has ``max_nodes`` and a description
    sets no upper bound, one is filled in: the nodes the others leave over go to the first such one."""
    bounds = [_node_bounds(component) for _, component in components]
    counts = [most if most is not None else fewest for most, fewest in bounds]
    if fill and limits.max_nodes is not None:
        spare = limits.max_nodes - sum(counts)
        for (_, component), (most, fewest), n in zip(components, bounds, range(len(counts)), strict=True):
            if most is None and spare >= 0:
                counts[n] = fewest + spare
                _fill_nodes(job, component, fewest, counts[n])
                spare = 0
    return counts


def _copy(job: JobBody) -> dict[str, Any]:
    """A copy of the document whose job descriptions can be changed: only their top-level keys are."""
    document = dict(job.document)
    for key in ("job", "jobs", "hetjob"):
        if isinstance(document.get(key), dict):
            document[key] = dict(document[key])
        elif isinstance(document.get(key), list):
            document[key] = [dict(c) if isinstance(c, dict) else c for c in document[key]]
    return document


def apply_limits(job: JobBody, limits: JobLimits | None) -> dict[str, Any]:
    """The document as it will be forwarded, or JobPolicyError naming the first field at fault."""
    limits = limits or NO_LIMITS
    document = _copy(job)
    fill = job.kind != "update"
    components = locate(job.kind, document)
    for where, component in components:
        _fields(limits, job, where, component)
        for key in ("account", "partition", "qos"):
            _choice(limits, where, component, key, fill)
        _time(limits, job, where, component, fill)
    total_nodes = total_cpus = 0
    for (where, component), nodes in zip(components, _node_counts(limits, job, components, fill), strict=True):
        total_nodes += nodes
        total_cpus += _cpus(component, nodes)
        if limits.max_nodes is not None and total_nodes > limits.max_nodes:
            raise JobPolicyError(
                _name(where, "nodes"),
                f"the job asks for up to {total_nodes} nodes; at most {limits.max_nodes} are allowed",
                reason="job_nodes_exceeded",
            )
        if limits.max_cpus is not None and total_cpus > limits.max_cpus:
            raise JobPolicyError(
                _name(where, "tasks"),
                f"the job asks for {total_cpus} CPUs; at most {limits.max_cpus} are allowed",
                reason="job_cpus_exceeded",
            )
    return document
