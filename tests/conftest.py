from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings
from pytest_httpx import HTTPXMock

from tests import helpers
from tests.fakeupstream import ThreadedFakeSlurmrestd
from tests.helpers import ISSUER, JWKS_URI, UPSTREAM, Signer, discovery

# Property tests check properties, not speed: on a loaded machine (both cores busy) an example may take
# longer than Hypothesis' 200 ms deadline, and generating data may trip its "too slow" health check.
settings.register_profile("loaded", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("loaded")


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("SLURMPROXY_") and name != "SLURMPROXY_DEVSTACK_CACHE":
            monkeypatch.delenv(name)
    yield


@pytest.fixture
def signer(httpx_mock: HTTPXMock) -> Signer:
    """The test issuer's keys, its discovery document and key set answered (optionally, repeatedly)."""
    signer = Signer()
    httpx_mock.add_response(
        url=f"{ISSUER}/.well-known/openid-configuration", json=discovery(), is_reusable=True, is_optional=True
    )
    httpx_mock.add_response(url=JWKS_URI, json=signer.jwks(), is_reusable=True, is_optional=True)
    return signer


@pytest.fixture
def upstream() -> Iterator[ThreadedFakeSlurmrestd]:
    """A stand-in slurmrestd over real loopback HTTP; make_settings() points the proxy at it.

    Like pytest-httpx: answers are registered under UPSTREAM, and the test fails if one is never
    requested or a request arrives that nothing was registered for.
    """
    fake = ThreadedFakeSlurmrestd(UPSTREAM).start()
    helpers.upstream_url = fake.url
    try:
        yield fake
    finally:
        helpers.upstream_url = None
        fake.close()
    fake.check()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI=true a skipped test fails the run: a missing real component must never pass silently."""
    if os.environ.get("CI", "").lower() not in {"1", "true", "yes"}:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = len(reporter.stats.get("skipped", []))
    if skipped:
        reporter.write_line(f"CI=true: {skipped} test(s) were skipped; failing the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
