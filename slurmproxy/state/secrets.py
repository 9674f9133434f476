"""The shared state's secrets, each read once at start-up from its file, never logged or shown."""

from __future__ import annotations

from pathlib import Path

from slurmproxy.errors import ConfigError
from slurmproxy.state.keys import PUBLIC_KEY


def read_password(path: Path | None, setting: str) -> str | None:
    """The password in ``path`` (one line; the line break is not part of it), or None without a file."""
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ConfigError(f"{setting}: cannot read {path}: {reason}") from exc
    password = text.rstrip("\r\n")
    if not password or "\n" in password:
        raise ConfigError(f"{setting}: {path} must hold the password on one line")
    return password


def read_hash_key(path: Path | None) -> bytes:
    """The HMAC key of state names (``state.hash_key_file``), or the public one (a plain hash) without a file."""
    if path is None:
        return PUBLIC_KEY
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"state.hash_key_file: cannot read {path}: {exc.strerror}") from exc
    if len(key) < 16:
        raise ConfigError(f"state.hash_key_file: {path} must hold at least 16 bytes")
    return key
