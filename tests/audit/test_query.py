from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from slurmproxy.audit.query import Query, Summary
from slurmproxy.core.durations import parse_time

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("90s", NOW - timedelta(seconds=90), id="seconds"),
        pytest.param("30m", NOW - timedelta(minutes=30), id="minutes"),
        pytest.param("12h", NOW - timedelta(hours=12), id="hours"),
        pytest.param("7d", NOW - timedelta(days=7), id="days"),
        pytest.param("2w", NOW - timedelta(weeks=2), id="weeks"),
        pytest.param("2026-11-20", datetime(2026, 11, 20, tzinfo=UTC), id="date-is-utc-midnight"),
        pytest.param("2026-11-20T10:00Z", datetime(2026, 11, 20, 10, tzinfo=UTC), id="zulu"),
        pytest.param(
            "2026-11-20T10:00+01:00", datetime(2026, 11, 20, 10, tzinfo=timezone(timedelta(hours=1))), id="offset"
        ),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", [pytest.param("yesterday", id="word"), pytest.param("5y", id="unit")])
def test_parse_time_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a time"):
        parse_time(text, NOW)


def test_a_record_without_a_readable_time_never_matches_a_time_range() -> None:
    assert Query().matches({"time": "garbage"})
    assert not Query(since=NOW).matches({"time": "garbage"})


def test_summary_of_nothing() -> None:
    assert Summary().as_dict()["total"] == 0 and Summary().as_dict()["first"] is None
