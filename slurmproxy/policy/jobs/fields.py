"""The job fields a caller may set, and the kind of value each takes, per body dialect.

Two dialects (slurmrestd's ``openapi/v0.0.38`` and ``data_parser`` plugins):

* ``legacy``: v0.0.36 to v0.0.38 (Slurm 22.05 and older): ``environment`` is an object, numbers are
  plain integers, ``nodes`` is ``[min, max]``;
* ``data_parser``: v0.0.39 and later (Slurm 23.02 and newer): ``environment`` is a list of ``K=V``
  strings, time limits and memory are an integer or ``{"set", "infinite", "number"}``, flags are
  lists of strings, ``nodes`` is a count or range as a string.

The lists are allow-lists: a field that is not here (or in a rule's ``job.extra_fields``) is
refused with 403, because from v0.0.39 on slurmrestd only *warns* about fields it does not know
and submits the job anyway. ``user_id`` and ``group_id`` are never allowed: the proxy, not the
caller, decides who runs the job.
"""

from __future__ import annotations

from typing import Literal

from slurmproxy.core.slurmrest import Dialect

# Kinds of value: see slurmproxy.jobs.body.check_value.
Kind = Literal["str", "int", "bool", "strs", "flags", "number", "env_object", "env_list", "nodes_range", "nodes_count"]

FORBIDDEN_FIELDS = frozenset({"user_id", "group_id"})

_COMMON: dict[str, Kind] = {
    "account": "str",
    "partition": "str",
    "qos": "str",
    "reservation": "str",
    "wckey": "str",
    "name": "str",
    "comment": "str",
    "current_working_directory": "str",
    "standard_output": "str",
    "standard_error": "str",
    "standard_input": "str",
    "constraints": "str",
    "dependency": "str",
    "mail_user": "str",
    "licenses": "str",
    "array": "str",
    "account_gather_frequency": "str",
    "cpu_binding": "str",
    "cpu_frequency": "str",
    "memory_binding": "str",
    "distribution": "str",
    "prefer": "str",
    "argv": "strs",
    "tasks": "int",
    "cpus_per_task": "int",
    "tasks_per_node": "int",
    "tasks_per_core": "int",
    "tasks_per_socket": "int",
    "threads_per_core": "int",
    "cores_per_socket": "int",
    "sockets_per_node": "int",
    "minimum_cpus_per_node": "int",
    "nice": "int",
    "delay_boot": "int",
    "hold": "bool",
    "requeue": "bool",
    "oversubscribe": "bool",
    "wait_all_nodes": "bool",
}

_LEGACY: dict[str, Kind] = {
    **_COMMON,
    "environment": "env_object",
    "time_limit": "int",
    "time_minimum": "int",
    "begin_time": "int",
    "deadline": "str",
    "memory_per_cpu": "int",
    "memory_per_node": "int",
    "memory_per_gpu": "int",
    "nodes": "nodes_range",
    "minimum_nodes": "bool",
    "exclusive": "str",
    "mail_type": "str",
    "open_mode": "str",
    "signal": "str",
    "get_user_environment": "bool",
    "kill_on_invalid_dependency": "bool",
    "no_kill": "bool",
    "spread_job": "bool",
    "gres": "str",
    "gres_flags": "str",
    "gpus": "str",
    "gpus_per_node": "str",
    "gpus_per_socket": "str",
    "gpus_per_task": "str",
    "cpus_per_gpu": "str",
    "gpu_binding": "str",
    "gpu_frequency": "str",
    "cpu_binding_hint": "str",
}

_DATA_PARSER: dict[str, Kind] = {
    **_COMMON,
    "environment": "env_list",
    "script": "str",
    "time_limit": "number",
    "time_minimum": "number",
    "begin_time": "number",
    "deadline": "int",
    "memory_per_cpu": "number",
    "memory_per_node": "number",
    "memory_per_tres": "str",
    "nodes": "nodes_count",
    "minimum_nodes": "int",
    "maximum_nodes": "int",
    "minimum_cpus": "int",
    "maximum_cpus": "int",
    "exclusive": "flags",
    "shared": "flags",
    "mail_type": "flags",
    "open_mode": "flags",
    "cpu_binding_flags": "flags",
    "memory_binding_type": "flags",
    "excluded_nodes": "flags",
    "required_nodes": "flags",
    "kill_on_node_fail": "bool",
    "kill_warning_flags": "flags",
    "kill_warning_signal": "str",
    "kill_warning_delay": "number",
    "tres_per_job": "str",
    "tres_per_node": "str",
    "tres_per_socket": "str",
    "tres_per_task": "str",
    "tres_bind": "str",
    "tres_freq": "str",
    "cpus_per_tres": "str",
    "ntasks_per_tres": "int",
    "contiguous": "bool",
    "temporary_disk_per_node": "int",
    "distribution_plane_size": "number",
    "extra": "str",
}

FIELDS: dict[Dialect, dict[str, Kind]] = {"legacy": _LEGACY, "data_parser": _DATA_PARSER}
KNOWN_FIELDS = frozenset(_LEGACY) | frozenset(_DATA_PARSER)
