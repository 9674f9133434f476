"""Which job fields a caller may set, and which of them add CPUs, nodes, GPUs, memory or array tasks.

The value each field takes is not written here: it comes from each API version's OpenAPI document
(:mod:`slurmproxy.policy.jobs.schema`). This module is the policy part, by name:

* ``ALLOWED``: the built-in allow-list. A field must be on it (or in a rule's ``job.extra_fields``)
  **and** be a field of the request's API version, else it is refused with 403: from v0.0.39 on
  slurmrestd only *warns* about fields it does not know and submits the job anyway. v0.0.38 names
  that later versions dropped (``gres``, ``gpus``, ``exclusive``, ``oversubscribe``, …) are on the
  list; the version's document decides where they exist.
* ``FORBIDDEN_FIELDS``: ``user_id`` and ``group_id``, never allowed: the proxy, not the caller,
  decides who runs the job.
* ``RESOURCE_FIELDS``: every field that can add CPUs, nodes, GPUs, memory or array tasks, in either
  dialect. :mod:`slurmproxy.policy.jobs.limits` counts them (or refuses those it cannot count) under
  a rule that limits a resource, and refuses them in updates under such a rule.
"""

from __future__ import annotations

FORBIDDEN_FIELDS = frozenset({"user_id", "group_id"})

ALLOWED = frozenset(
    {
        # who, where, what
        "account",
        "partition",
        "qos",
        "reservation",
        "wckey",
        "name",
        "comment",
        "extra",
        "script",
        "argv",
        "environment",
        "current_working_directory",
        "standard_output",
        "standard_error",
        "standard_input",
        "open_mode",
        "constraints",
        "prefer",
        "dependency",
        "licenses",
        "mail_user",
        "mail_type",
        "account_gather_frequency",
        "nice",
        "hold",
        "requeue",
        "begin_time",
        "deadline",
        "delay_boot",
        "wait_all_nodes",
        "signal",
        "kill_on_node_fail",
        "kill_warning_flags",
        "kill_warning_signal",
        "kill_warning_delay",
        "get_user_environment",
        "kill_on_invalid_dependency",
        "no_kill",
        # time
        "time_limit",
        "time_minimum",
        # nodes
        "nodes",
        "minimum_nodes",
        "maximum_nodes",
        "required_nodes",
        "excluded_nodes",
        "contiguous",
        "spread_job",
        # tasks and CPUs
        "array",
        "tasks",
        "cpus_per_task",
        "tasks_per_node",
        "tasks_per_core",
        "tasks_per_socket",
        "threads_per_core",
        "cores_per_socket",
        "sockets_per_node",
        "minimum_cpus",
        "maximum_cpus",
        "minimum_cpus_per_node",
        "exclusive",
        "shared",
        "oversubscribe",
        "cpu_binding",
        "cpu_binding_flags",
        "cpu_binding_hint",
        "cpu_frequency",
        "distribution",
        "distribution_plane_size",
        # memory, disk
        "memory_per_cpu",
        "memory_per_node",
        "memory_per_gpu",
        "memory_per_tres",
        "memory_binding",
        "memory_binding_type",
        "temporary_disk_per_node",
        # GPUs and other trackable resources
        "gres",
        "gres_flags",
        "gpus",
        "gpus_per_node",
        "gpus_per_socket",
        "gpus_per_task",
        "cpus_per_gpu",
        "gpu_binding",
        "gpu_frequency",
        "tres_per_job",
        "tres_per_node",
        "tres_per_socket",
        "tres_per_task",
        "tres_bind",
        "tres_freq",
        "cpus_per_tres",
        "ntasks_per_tres",
    }
)

NODE_FIELDS = frozenset({"nodes", "minimum_nodes", "maximum_nodes", "required_nodes"})
CPU_FIELDS = frozenset(
    {
        "tasks",
        "cpus_per_task",
        "tasks_per_node",
        "minimum_cpus",
        "maximum_cpus",
        "minimum_cpus_per_node",
        "cpus_per_tres",
        "cpus_per_gpu",
        "ntasks_per_tres",
    }
)
GPU_FIELDS = frozenset(
    {
        "gres",
        "gpus",
        "gpus_per_node",
        "gpus_per_socket",
        "gpus_per_task",
        "tres_per_job",
        "tres_per_node",
        "tres_per_socket",
        "tres_per_task",
    }
)
MEMORY_FIELDS = frozenset({"memory_per_cpu", "memory_per_node", "memory_per_gpu", "memory_per_tres"})
WHOLE_NODE_FIELDS = frozenset({"exclusive", "shared", "oversubscribe", "core_specification", "thread_specification"})
"""Fields that can give the job whole nodes (every CPU and GPU on them) whatever it counts."""
THREAD_FIELDS = frozenset({"threads_per_core", "tasks_per_core", "cpu_binding_hint"})
"""Fields that make Slurm allocate whole cores: up to threads-per-core times the CPUs counted."""
RESOURCE_FIELDS = NODE_FIELDS | CPU_FIELDS | GPU_FIELDS | MEMORY_FIELDS | WHOLE_NODE_FIELDS | THREAD_FIELDS | {"array"}

CRASHES_SLURMRESTD: dict[str, dict[str, str]] = {
    "v0.0.38": {"argv": "slurmrestd 22.05 crashes on any argv but an empty list (measured with 22.05.8)"},
}
"""Values a version's slurmrestd crashes on (beyond ``null``, which the committed rules cover): refused
whatever the rule, so that no caller can take slurmrestd down for everyone."""

KNOWN_FIELDS = ALLOWED
"""The fields a rule's ``extra_fields`` need not (and may not) name again."""
