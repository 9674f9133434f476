"""The committed job-body rules per API version, and the value checks made from them."""

from __future__ import annotations

from typing import Any

import pytest

from slurmproxy.policy.jobs.fields import ALLOWED, FORBIDDEN_FIELDS, RESOURCE_FIELDS
from slurmproxy.policy.jobs.schema import conforms, known_versions, rules_for

SERVED = ["v0.0.38", "v0.0.40", "v0.0.41", "v0.0.42", "v0.0.43", "v0.0.44", "v0.0.45"]


def test_every_version_the_harness_serves_has_rules() -> None:
    assert list(known_versions()) == SERVED


def test_versions_without_rules_use_the_nearest_of_their_dialect() -> None:
    assert rules_for("v0.0.37").version == "v0.0.38"
    assert rules_for("v0.0.39").version == "v0.0.40"  # 23.02: data_parser, no older data_parser known
    assert rules_for("v0.0.46").version == "v0.0.45"


def test_every_allowed_field_exists_in_some_version_and_none_is_forbidden() -> None:
    every = set().union(*(rules_for(v).fields for v in SERVED))
    assert not ALLOWED - every, sorted(ALLOWED - every)
    assert not ALLOWED & FORBIDDEN_FIELDS
    assert not RESOURCE_FIELDS - every - {"core_specification", "thread_specification"}


@pytest.mark.parametrize(
    ("version", "field", "good", "bad"),
    [
        ("v0.0.38", "nodes", [[1], [1, 4]], [[], [1, 2, 3], "1", [True]]),
        ("v0.0.38", "environment", [{"A": "b"}], [["A=b"], "A=b"]),
        ("v0.0.38", "tasks", [0, 4], [-1, "4", 4.0, True, 2**63]),
        ("v0.0.42", "time_limit", [5, {"set": True, "number": 5}, {"infinite": True}, {"set": False}], [{}, "5", -1]),
        ("v0.0.42", "time_limit", [], [{"number": 5, "extra": 1}, {"number": "5"}, {"set": "yes"}]),
        ("v0.0.42", "mail_type", [["END", "FAIL"], "END", []], ["END,FAIL", ["end"], [1]]),
        ("v0.0.42", "required_nodes", [["a", "b"]], ["a,b", [1]]),
        ("v0.0.42", "environment", [["A=b"]], [{"A": "b"}, "A=b"]),
        ("v0.0.42", "hold", [True, False], [1, "true"]),
        ("v0.0.42", "nodes", ["1", "1-4"], [1, [1, 4]]),
        ("v0.0.42", "rlimits", [{"cpu": 5}, {"nofile": {"set": True, "number": 10}}], [{"cpu": "5"}, {"nosuch": 1}]),
    ],
)
def test_values_are_checked_in_the_documented_forms(version: str, field: str, good: list[Any], bad: list[Any]) -> None:
    rules = rules_for(version)
    shape = rules.fields[field]
    assert [v for v in good if not conforms(v, shape, rules.dialect)] == []
    assert [v for v in bad if conforms(v, shape, rules.dialect)] == []


def test_null_verdicts_were_measured_for_every_field() -> None:
    for version in SERVED:
        rules = rules_for(version)
        assert set(rules.fields) - set(rules.null) <= FORBIDDEN_FIELDS, version
        assert set(rules.null.values()) <= {"unset", "changes", "refused", "crashes"}
    assert not rules_for("v0.0.38").takes_null("argv")  # 22.05's slurmrestd crashes on it
    assert rules_for("v0.0.42").takes_null("partition") and not rules_for("v0.0.38").takes_null("partition")
