"""Reading resource values as Slurm writes them: what the proxy counts, and what it cannot."""

from __future__ import annotations

from typing import Any

import pytest

from slurmproxy.policy.jobs.resources import (
    Uncountable,
    array_spec,
    cpus_in,
    gpu_count,
    gpus_in,
    host_count,
    megabytes,
    node_counts,
    per_gpu,
)


@pytest.mark.parametrize(
    ("value", "counts"), [("2", [2]), ("1-4", [1, 4]), ("1,4,8", [1, 4, 8]), ([1, 3], [1, 3]), (2, [2])]
)
def test_node_counts(value: Any, counts: list[int]) -> None:
    assert node_counts(value) == counts


@pytest.mark.parametrize("value", ["0", "1-x", "", "1,,2", [0], [True], "2-", None])
def test_node_counts_it_cannot_read(value: Any) -> None:
    with pytest.raises(Uncountable):
        node_counts(value)


@pytest.mark.parametrize(
    ("value", "count"),
    [(["a"], 1), (["a", "b"], 2), ("a,b", 2), (["n[1-4]"], 4), (["n[1-3,7]", "m"], 5), (["r[1-2]n[1-3]"], 6)],
)
def test_host_count(value: Any, count: int) -> None:
    assert host_count(value) == count


@pytest.mark.parametrize("value", [["n[1-"], ["n[3-1]"], ["n[[1]]"], ["a b"], [5], ["n[1-999999999]"]])
def test_host_lists_it_cannot_read(value: Any) -> None:
    with pytest.raises(Uncountable):
        host_count(value)


@pytest.mark.parametrize(
    ("value", "tasks", "at_once"),
    [("0-99", 100, 100), ("1,3,5-9:2", 5, 5), ("0-99999%10", 100000, 10), ("7", 1, 1), ("0-9%0", 10, 10)],
)
def test_array_specifications(value: str, tasks: int, at_once: int) -> None:
    spec = array_spec(value)
    assert (spec.tasks, spec.at_once) == (tasks, at_once)


@pytest.mark.parametrize("value", ["", "a", "5-1", "1-5:0", "1-5%x", "1," * 2000])
def test_array_specifications_it_cannot_read(value: str) -> None:
    with pytest.raises(Uncountable):
        array_spec(value)


def test_gpus_and_cpus_in_trackable_resource_strings() -> None:
    assert gpus_in("gres/gpu:2") == gpus_in("gres/gpu=2") == gpus_in("gres/gpu:a100:2") == 2
    assert gpus_in("gres/gpu") == 1
    assert gpus_in("gres/gpu:1,gres/mps:100,cpu=4") == 1  # mps shares a GPU; CPUs are counted elsewhere
    assert gpus_in("gpu:tesla:2,mps:100") == 2  # v0.0.38's gres
    assert cpus_in("cpu=128") == cpus_in("cpu:128") == 128 and cpus_in("gres/gpu:1") == 0
    assert gpu_count("2") == gpu_count("a100:2") == 2 and gpu_count("a100:2,v100:1") == 3
    assert per_gpu("gres/gpu:32") == 32 and per_gpu("gres/gpu:4G") == 4096
    for uncountable in ("license/x:1", "mem=4G", "gres/gpu:a:b:2", "bad name"):
        with pytest.raises(Uncountable):
            gpus_in(uncountable)
    with pytest.raises(Uncountable):
        per_gpu("gres/mps:10")


def test_megabytes() -> None:
    assert megabytes(100) == 100 and megabytes("512M") == 512 and megabytes("16G") == 16384
    assert megabytes("1T") == 1024 * 1024 and megabytes("1536K") == 2
    with pytest.raises(Uncountable):
        megabytes("lots")
