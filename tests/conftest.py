from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("SLURMPROXY_") and name != "SLURMPROXY_DEVSTACK_CACHE":
            monkeypatch.delenv(name)
    yield


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
