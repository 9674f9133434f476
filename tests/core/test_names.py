from __future__ import annotations

import pytest

from slurmproxy.core.names import USER_NAME_PATTERN, is_user_name


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        pytest.param("alice", True, id="plain"),
        pytest.param("_svc-1", True, id="underscore-digits-dash"),
        pytest.param("a" * 32, True, id="32-chars"),
        pytest.param("a" * 33, False, id="33-chars"),
        pytest.param("Alice", False, id="upper-case"),
        pytest.param("1alice", False, id="leading-digit"),
        pytest.param("-alice", False, id="leading-dash"),
        pytest.param("al ice", False, id="space"),
        pytest.param("alice\n", False, id="newline"),
        pytest.param("", False, id="empty"),
    ],
)
def test_user_names(name: str, valid: bool) -> None:
    assert is_user_name(name) is valid


def test_the_pattern_for_settings_is_the_same_rule() -> None:
    import re

    assert re.fullmatch(USER_NAME_PATTERN.strip("^$"), "svc-alpha") and USER_NAME_PATTERN.startswith("^")
