"""Durations as admins write them on the command line: ``3600``, ``90s``, ``30m``, ``12h``, ``7d``, ``2w``."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, *, unit_required: bool = False) -> float:
    """Seconds in ``text``; a bare number is seconds unless ``unit_required``. ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or (unit_required and not match.group(2)):
        raise ValueError(f"not a duration: {text!r} (examples: 3600, 90m, 12h, 30d)")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive means UTC), or a span back from now: ``90s``, ``30m``, ``12h``, ``7d``, ``2w``."""
    try:
        seconds = parse_duration(text, unit_required=True)
    except ValueError:
        pass
    else:
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use ISO 8601, e.g. 2026-11-22T10:00, or 30m, 12h, 7d)") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
