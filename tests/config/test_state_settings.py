"""The ``state:`` section: embedded by default, shared with Redis and PostgreSQL, secrets only from files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from slurmproxy.config.settings import load_settings
from slurmproxy.errors import ConfigError

UP = {"url": "http://127.0.0.1:6820", "auth": "mint", "jwt_key_file": "k"}
REDIS = {"url": "redis://redis.example.org:6379/0", "password_file": "redis.pw"}
PG = {"dsn": "postgresql://slurmproxy@db.example.org/slurmproxy", "password_file": "pg.pw"}
POOLS = {"pools": {"vo": {"accounts": ["p1..p3"]}}}


def load(tmp_path: Path, **sections: Any) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"upstream": UP, **sections}))
    return load_settings(path)


def test_embedded_is_the_default_and_needs_no_server(tmp_path: Path) -> None:
    state = load(tmp_path).state
    assert (state.backend, state.redis, state.postgres) == ("embedded", None, None)
    assert (state.rate_limit_outage, state.shield_outage) == ("fail_closed", "local")


def test_shared_settings_resolve_files_and_keep_their_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path, identity=POOLS, state={"backend": "shared", "redis": REDIS, "postgres": PG})
    redis, pg = settings.state.redis, settings.state.postgres
    assert redis.password_file == tmp_path / "redis.pw" and redis.key_prefix == "slurmproxy:"
    assert redis.timeout_seconds == 0.5 and pg.timeout_seconds == 2.0 and pg.pool_size == 4
    assert settings.identity.pool_database is None  # the leases are in PostgreSQL


@pytest.mark.parametrize(
    ("state", "identity", "message"),
    [
        pytest.param({"backend": "shared"}, {}, "backend 'shared' needs redis", id="shared-without-redis"),
        pytest.param(
            {"backend": "shared", "redis": REDIS}, POOLS, "need state.postgres (the leases)", id="pools-without-pg"
        ),
        pytest.param(
            {"backend": "shared", "redis": {"url": "redis://:s3cret@r:6379/0"}},
            {},
            "must not hold a user or password",
            id="redis-password-in-url",
        ),
        pytest.param(
            {"backend": "shared", "redis": {"url": "redis://r/0?password=s3cret"}},
            {},
            "must not hold a password",
            id="redis-password-in-query",
        ),
        pytest.param(
            {"backend": "shared", "redis": {"url": "redis://r/0", "ca_file": "ca.pem"}},
            {},
            "need a rediss:// url",
            id="tls-files-without-tls",
        ),
        pytest.param(
            {"backend": "shared", "redis": REDIS, "postgres": {"dsn": "postgresql://u:s3cret@db/x"}},
            POOLS,
            "dsn must not hold a password",
            id="pg-password-in-url",
        ),
        pytest.param(
            {"backend": "shared", "redis": REDIS, "postgres": {"dsn": "host=db user=u password=s3cret"}},
            POOLS,
            "dsn must not hold a password",
            id="pg-password-keyword",
        ),
        pytest.param({"backend": "replicated"}, {}, "state.backend", id="unknown-backend"),
        pytest.param({"rate_limit_outage": "open"}, {}, "state.rate_limit_outage", id="no-fail-open"),
    ],
)
def test_refused(tmp_path: Path, state: dict[str, Any], identity: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, state=state, identity=identity)
    assert message in refused.value.detail
    assert "s3cret" not in refused.value.detail  # the error never echoes a secret


def test_embedded_pools_still_need_their_sqlite_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pools need pool_database"):
        load(tmp_path, identity=POOLS)
