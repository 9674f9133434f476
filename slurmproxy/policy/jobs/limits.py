"""One rule's job constraints applied to a parsed body: refuse what is not allowed, fill defaults.

For every job description in the body (``job``, each of ``jobs[]``/``hetjob[]``, or the whole
body of an update):

1. every field must be on the built-in allow-list or in the rule's ``job.extra_fields``, and be a
   field of the request's API version (its OpenAPI document);
2. ``account``, ``partition`` (each of a comma-separated list) and ``qos``, when the rule lists
   allowed values, must be one of them; a submission that names none gets the default;
3. ``time_limit`` and ``time_minimum`` must not exceed ``max_time``; a submission without a
   time limit gets ``default_time`` (or ``max_time``); an infinite limit is refused when
   ``max_time`` is set;
4. under a rule that limits nodes, CPUs, GPUs, memory or array tasks, every field that adds any of
   them is counted (:mod:`slurmproxy.policy.jobs.resources`), and a field the proxy cannot count
   for a limited resource is refused: whole nodes (``exclusive``, ``shared: none``,
   ``oversubscribe: false``, core specialisation) and whole cores (``threads_per_core``,
   ``tasks_per_core``, ``cpu_binding_hint``) under a CPU, GPU or memory limit, per-socket GPUs, TRES
   the proxy does not know, infinite or zero ("all of it") memory;
5. the totals must not exceed ``max_nodes``, ``max_cpus``, ``max_gpus``, ``max_memory`` and
   ``max_array_tasks``. An array job counts each resource once per task that may run at once (all of
   them, or ``%N``);
6. a submission that sets no upper bound on its nodes gets one under ``max_nodes`` (what its other
   components leave), and under a CPU, GPU or memory limit when it asks for something per node (its
   fewest nodes); a submission without memory gets ``default_memory`` (else ``max_memory``) spread
   over its nodes when the rule has ``max_memory``.

Nodes, CPUs, GPUs and memory of a heterogeneous job are summed over its components. An update is
checked field by field, with nothing filled in; it cannot be counted (the proxy does not know the
job's other values), so under a rule that limits any resource an update that changes any field
which adds one is refused (``job_update_changes_resources``). The input is never modified: a new
document is returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slurmproxy.errors import JobPolicyError
from slurmproxy.policy.jobs.body import JobBody, locate
from slurmproxy.policy.jobs.fields import ALLOWED, RESOURCE_FIELDS, THREAD_FIELDS, WHOLE_NODE_FIELDS
from slurmproxy.policy.jobs.resources import (
    Uncountable,
    array_spec,
    cpus_in,
    gpu_count,
    gpus_in,
    host_count,
    no_val_number,
    node_counts,
    per_gpu,
    tres_list,
)
from slurmproxy.policy.limits import JobLimits

NO_LIMITS = JobLimits()
INFINITE = -1
ALL = frozenset({"nodes", "cpus", "gpus", "memory", "array"})
BUSY = frozenset({"cpus", "gpus", "memory"})


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def limited(limits: JobLimits) -> frozenset[str]:
    """The resources this rule limits."""
    pairs = [
        ("nodes", limits.max_nodes),
        ("cpus", limits.max_cpus),
        ("gpus", limits.max_gpus),
        ("memory", limits.max_memory_mb),
        ("array", limits.max_array_tasks),
    ]
    return frozenset(name for name, value in pairs if value is not None)


# --- account, partition, QOS, time ----------------------------------------------------------------


def _minutes(value: Any) -> int | None:
    """Minutes in a time value of either dialect; None if unset, INFINITE if infinite."""
    try:
        return no_val_number(value)
    except Uncountable:
        return INFINITE


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
        component["time_limit"] = _number(job, limits.default_minutes)


def _number(job: JobBody, number: int) -> Any:
    return number if job.dialect == "legacy" else {"set": True, "infinite": False, "number": number}


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
    for key in component:
        name = _name(where, key)
        if key not in ALLOWED and key not in limits.extra_fields:
            raise JobPolicyError(name, f"{name} is not a job field this proxy allows")
        if key not in job.rules.fields:
            raise JobPolicyError(
                name,
                f"{name} is not a job field of {job.version} (slurmrestd would ignore it)",
                reason="job_field_not_in_version",
            )


# --- resources ------------------------------------------------------------------------------------


@dataclass
class Ask:
    """What one job description asks for. ``most_nodes`` is None while it sets no upper bound."""

    fewest_nodes: int = 1
    most_nodes: int | None = None
    tasks: int = 1
    cpus: int = 1
    gpus: int = 0
    memory_mb: int | None = None  # None: it asks for none (Slurm's default would apply)
    array_tasks: int = 0
    at_once: int = 1
    per_node: frozenset[str] = frozenset()  # resources it asks for per node: they need a node bound
    uncountable: list[tuple[str, frozenset[str], str]] = field(default_factory=list)

    @property
    def nodes(self) -> int:
        return self.most_nodes if self.most_nodes is not None else self.fewest_nodes


_PER_NODE = {
    "cpus": ("tasks_per_node", "minimum_cpus_per_node"),
    "gpus": ("gpus_per_node", "gres", "tres_per_node"),
    "memory": ("memory_per_node",),
}
_MEMORY = ("memory_per_node", "memory_per_cpu", "memory_per_gpu", "memory_per_tres")
GPU_DERIVED = frozenset({"gpus", "cpus", "memory"})
"""What a GPU count feeds: CPUs and memory per GPU, tasks per GPU."""


class _Reader:
    """Reads one component's resource fields; what it cannot read it notes as uncountable."""

    def __init__(self, component: dict[str, Any]) -> None:
        self.component = component
        self.ask = Ask()
        self.ask.per_node = frozenset(r for r, keys in _PER_NODE.items() if any(k in component for k in keys))

    def int_field(self, key: str, default: int = 0) -> int:
        value = self.component.get(key, default)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    def read(self, key: str, resources: frozenset[str], parse: Callable[[Any], int], default: int = 0) -> int:
        if key not in self.component:
            return default
        try:
            return parse(self.component[key])
        except Uncountable as why:
            self.cannot(key, resources, str(why))
            return default

    def cannot(self, key: str, resources: frozenset[str], why: str) -> None:
        self.ask.uncountable.append((key, resources, why))


def _nodes(reader: _Reader) -> None:
    ask, component = reader.ask, reader.component
    counts: list[int] = []
    if "nodes" in component:
        try:
            counts = node_counts(component["nodes"])
        except Uncountable as why:
            reader.cannot("nodes", ALL, str(why))
        ask.fewest_nodes = min(counts, default=1)
    if "minimum_nodes" in component and not isinstance(component["minimum_nodes"], bool):  # v0.0.38: a bool
        ask.fewest_nodes = max(ask.fewest_nodes, reader.int_field("minimum_nodes", 1))
    if reader.int_field("maximum_nodes") > 0:
        counts.append(reader.int_field("maximum_nodes"))
    ask.fewest_nodes = max(ask.fewest_nodes, reader.read("required_nodes", ALL, host_count))
    if counts:
        ask.most_nodes = max([*counts, ask.fewest_nodes])


def _whole(job: JobBody, key: str, value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    if key == "exclusive":
        return "true" in values
    if key == "shared":
        return "none" in values
    if key == "oversubscribe":
        # v0.0.40/41 read false as "shared: none" (measured: a one-CPU job got both CPUs of the node);
        # v0.0.38 reads it as shared, not a whole node
        return value is False and job.dialect == "data_parser"
    return True  # core_specification, thread_specification: they imply exclusive


def _shape(job: JobBody, reader: _Reader) -> None:
    """Whole nodes and whole cores: the job gets more than it counts."""
    component = reader.component
    for key in sorted(WHOLE_NODE_FIELDS & component.keys()):
        if _whole(job, key, component[key]):
            reader.cannot(key, BUSY, f"{key} {component[key]!r} gives the job whole nodes")
    for key in sorted(THREAD_FIELDS & component.keys()):
        reader.cannot(key, BUSY, f"{key} makes Slurm allocate whole cores")
    if "array" in component:
        try:
            spec = array_spec(str(component["array"]))
            reader.ask.array_tasks, reader.ask.at_once = spec.tasks, max(spec.at_once, 1)
        except Uncountable as why:
            reader.cannot("array", ALL, str(why))


def _gpus(reader: _Reader, nodes: int) -> tuple[int, int]:
    """(GPUs for the whole job and per node, counted over its nodes; GPUs per task)."""
    component = reader.component
    per_job = reader.read("gpus", GPU_DERIVED, gpu_count) + reader.read("tres_per_job", GPU_DERIVED, gpus_in)
    per_node = (
        reader.read("gpus_per_node", GPU_DERIVED, gpu_count)
        + reader.read("gres", GPU_DERIVED, gpus_in)
        + reader.read("tres_per_node", GPU_DERIVED, gpus_in)
    )
    per_task = reader.read("gpus_per_task", GPU_DERIVED, gpu_count) + reader.read("tres_per_task", GPU_DERIVED, gpus_in)
    for key in ("gpus_per_socket", "tres_per_socket"):
        if key in component:
            reader.cannot(key, GPU_DERIVED, f"{key}: the proxy does not know how many sockets the job gets")
    for key in ("tres_per_job", "tres_per_node"):
        try:
            if key in component and any(t.name == "cpu" for t in tres_list(component[key])):
                reader.cannot(key, BUSY, f"{key}: CPUs are counted from tasks and tres_per_task only")
        except Uncountable:
            pass  # noted when its GPUs were read
    return per_job + per_node * nodes, per_task


def _memory_value(value: Any) -> int:
    number = no_val_number(value)
    if number is None:
        return -1  # {"set": false}: not set
    if number == 0:
        raise Uncountable("0 means all the memory of each node")
    return number


def _count(reader: _Reader) -> None:
    """Tasks, CPUs, GPUs and memory of one component, once its node bounds are known."""
    ask, component = reader.ask, reader.component
    nodes = ask.nodes
    gpus, gpus_per_task = _gpus(reader, nodes)
    per_task = max(reader.int_field("cpus_per_task", 1), 1, reader.read("tres_per_task", BUSY, cpus_in))
    tasks = max(reader.int_field("tasks", 1), 1, reader.int_field("tasks_per_node") * nodes)
    tasks = max(tasks, reader.int_field("ntasks_per_tres") * gpus)
    gpus += gpus_per_task * tasks
    ask.tasks, ask.gpus = tasks, gpus
    ask.cpus = max(
        tasks * per_task,
        reader.int_field("minimum_cpus"),
        reader.int_field("maximum_cpus"),
        reader.int_field("minimum_cpus_per_node") * nodes,
        reader.read("cpus_per_gpu", BUSY, gpu_count) * gpus,
        reader.read("cpus_per_tres", BUSY, per_gpu) * gpus,
    )
    memory = frozenset({"memory"})
    times = {"memory_per_node": nodes, "memory_per_cpu": ask.cpus, "memory_per_gpu": gpus, "memory_per_tres": gpus}
    parse: dict[str, Callable[[Any], int]] = {"memory_per_tres": lambda v: per_gpu(v) or -1}
    amounts = [
        reader.read(key, memory, parse.get(key, _memory_value), -1) * times[key] for key in _MEMORY if key in component
    ]
    set_amounts = [amount for amount in amounts if amount >= 0]
    ask.memory_mb = sum(set_amounts) if set_amounts else None


def _memory_set(component: dict[str, Any]) -> bool:
    """Whether the component asks for memory (``{"set": false}`` does not)."""
    for key in _MEMORY:
        value = component.get(key)
        if isinstance(value, dict) and not value.get("infinite", False) and not value.get("set", "number" in value):
            continue
        if value is not None:
            return True
    return False


def _fill_nodes(job: JobBody, component: dict[str, Any], fewest: int, most: int) -> None:
    if job.dialect == "legacy":
        component["nodes"] = [fewest, most]
    else:
        component["maximum_nodes"] = most


def _bound_nodes(
    limits: JobLimits, job: JobBody, components: list[tuple[str, dict[str, Any]]], asks: list[Ask]
) -> None:
    """Give an upper node bound to the components that set none: under ``max_nodes``, the nodes the
    others leave go to the first such one; under a CPU, GPU or memory limit, a component that asks
    for something per node (memory included, when it is filled in) gets its fewest nodes."""
    rule_limits = limited(limits)
    if limits.max_nodes is not None:
        spare = limits.max_nodes - sum(a.nodes * a.at_once for a in asks)
        for (_, component), ask in zip(components, asks, strict=True):
            if ask.most_nodes is None and spare >= 0:
                ask.most_nodes = ask.fewest_nodes + spare // ask.at_once
                _fill_nodes(job, component, ask.fewest_nodes, ask.most_nodes)
                spare = 0
    for (_, component), ask in zip(components, asks, strict=True):
        filled_memory = limits.max_memory_mb is not None and not _memory_set(component)
        if ask.most_nodes is None and (ask.per_node & rule_limits or filled_memory):
            ask.most_nodes = ask.fewest_nodes
            _fill_nodes(job, component, ask.fewest_nodes, ask.most_nodes)


Components = list[tuple[str, dict[str, Any]]]


def _fill_memory(limits: JobLimits, job: JobBody, components: Components, asks: list[Ask]) -> None:
    """Components without memory share ``default_memory`` (else ``max_memory``), as memory per node."""
    budget = limits.default_memory_mb if limits.default_memory_mb is not None else limits.max_memory_mb
    if budget is None:
        return
    pairs = zip(components, asks, strict=True)
    without = [(where, component, ask) for (where, component), ask in pairs if ask.memory_mb is None]
    if not without:
        return
    spare = budget - sum(a.memory_mb * a.at_once for a in asks if a.memory_mb is not None)
    share = spare // len(without)
    for where, component, ask in without:
        per_node = share // (ask.nodes * ask.at_once)
        if per_node < 1:
            raise JobPolicyError(
                _name(where, "memory_per_node"),
                f"no memory is left for {where or 'the job'} within {limits.max_memory_mb} MB",
                reason="job_memory_exceeded",
            )
        component["memory_per_node"] = _number(job, per_node)
        ask.memory_mb = per_node * ask.nodes


def _check_countable(rule_limits: frozenset[str], where: str, ask: Ask) -> None:
    for key, resources, why in ask.uncountable:
        hit = resources & rule_limits
        if hit:
            name = _name(where, key)
            raise JobPolicyError(
                name,
                f"{name}: {why}; under a rule that limits {', '.join(sorted(hit))} the proxy must count it",
                reason="job_resources_uncountable",
            )


_TOTALS = (
    ("nodes", "max_nodes", "nodes", "job_nodes_exceeded", "up to {} nodes"),
    ("cpus", "max_cpus", "tasks", "job_cpus_exceeded", "{} CPUs"),
    ("gpus", "max_gpus", "gpus", "job_gpus_exceeded", "{} GPUs"),
    ("memory_mb", "max_memory_mb", "memory_per_node", "job_memory_exceeded", "{} MB of memory"),
)


def _check_totals(limits: JobLimits, components: list[tuple[str, dict[str, Any]]], asks: list[Ask]) -> None:
    totals = dict.fromkeys(("nodes", "cpus", "gpus", "memory_mb", "array_tasks"), 0)
    for (where, component), ask in zip(components, asks, strict=True):
        for attribute, limit_name, key, reason, asked in _TOTALS:
            limit = getattr(limits, limit_name)
            one: int = getattr(ask, attribute) or 0
            totals[attribute] += one * ask.at_once
            if limit is not None and totals[attribute] > limit:
                at_once = ask.at_once > 1 and totals[attribute] - one * (ask.at_once - 1) <= limit
                field_name = _name(where, "array" if at_once else key)
                why = f"; {ask.at_once} array tasks may run at once: add %N to array" if at_once else ""
                raise JobPolicyError(
                    field_name,
                    f"the job asks for {asked.format(totals[attribute])}{why}; at most {limit} are allowed",
                    reason=reason,
                )
        totals["array_tasks"] += ask.array_tasks if "array" in component else 0
        if limits.max_array_tasks is not None and totals["array_tasks"] > limits.max_array_tasks:
            raise JobPolicyError(
                _name(where, "array"),
                f"the job array has {totals['array_tasks']} tasks; at most {limits.max_array_tasks} are allowed",
                reason="job_array_tasks_exceeded",
            )


def _update(limits: JobLimits, component: dict[str, Any]) -> None:
    """An update cannot be counted: under a rule that limits a resource, it may not change one."""
    rule_limits = limited(limits)
    changed = sorted(RESOURCE_FIELDS & component.keys())
    if rule_limits and changed:
        raise JobPolicyError(
            changed[0],
            f"{changed[0]} cannot be changed by an update under a rule that limits {', '.join(sorted(rule_limits))}"
            " (the proxy cannot see the job's other values); cancel the job and submit it again",
            reason="job_update_changes_resources",
        )


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
    if not fill:
        _update(limits, components[0][1])
        return document
    readers = [_Reader(component) for _, component in components]
    for reader in readers:
        _nodes(reader)
        _shape(job, reader)
    asks = [reader.ask for reader in readers]
    _bound_nodes(limits, job, components, asks)
    for (where, _), reader in zip(components, readers, strict=True):
        _count(reader)
        _check_countable(limited(limits), where, reader.ask)
    _fill_memory(limits, job, components, asks)
    _check_totals(limits, components, asks)
    return document
