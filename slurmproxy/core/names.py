"""The one rule for local account names: POSIX user names as useradd accepts them by default."""

from __future__ import annotations

import re

USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
USER_NAME_PATTERN = f"^{USER_NAME.pattern}$"
"""For pydantic ``pattern=`` fields."""


def is_user_name(name: str) -> bool:
    return USER_NAME.fullmatch(name) is not None
