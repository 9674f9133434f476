"""The guard around every shared-state call: bounded, remembered, probed back to life (no servers needed)."""

from __future__ import annotations

import asyncio
import time

import pytest

from slurmproxy.observability.metrics import Metrics
from slurmproxy.state.guard import BackendDown, Guard

pytestmark = pytest.mark.anyio


def classify(exc: BaseException) -> str | None:
    return "unreachable" if isinstance(exc, ConnectionError) else None


async def test_a_call_is_bounded_even_when_its_cancellation_waits() -> None:
    """psycopg answers a cancellation by asking the server to cancel, for seconds: the caller must not wait."""
    cancelled = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            await asyncio.sleep(5)  # clean-up that takes long
            raise

    guard = Guard("PostgreSQL", timeout=0.1, retry_seconds=60, classify=classify, detach=True)
    started = time.monotonic()
    with pytest.raises(BackendDown) as failed:
        await guard.call("leases", stubborn)
    assert time.monotonic() - started < 1.0 and failed.value.kind == "timeout"
    await asyncio.wait_for(cancelled.wait(), 5)  # the operation was told to stop, in the background


async def test_down_fails_at_once_until_the_probe_sees_it_answer() -> None:
    metrics, answering = Metrics(), asyncio.Event()
    calls = 0

    async def probe() -> None:
        if not answering.is_set():
            raise ConnectionError("refused")

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("refused")

    guard = Guard("Redis", timeout=1, retry_seconds=0.05, classify=classify, metrics=metrics, probe=probe)
    with pytest.raises(BackendDown):
        await guard.call("rate_limit", refused)
    for _ in range(3):
        with pytest.raises(BackendDown) as down:
            await guard.call("rate_limit", refused)
        assert down.value.kind == "down" and "Redis is down" in down.value.detail
    assert calls == 1  # not asked while down
    answering.set()
    deadline = time.monotonic() + 10
    while guard.down:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)

    async def fine() -> str:
        return "ok"

    assert await guard.call("rate_limit", fine) == "ok"
    await guard.aclose()
    text = metrics.render().decode()
    assert 'slurmproxy_state_errors_total{backend="Redis",kind="unreachable",use="rate_limit"} 1.0' in text
    assert 'slurmproxy_state_errors_total{backend="Redis",kind="down",use="rate_limit"} 3.0' in text


async def test_an_error_that_is_not_the_backends_is_raised_as_it_is() -> None:
    async def bug() -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        await Guard("Redis", timeout=1, retry_seconds=1, classify=classify).call("x", bug)
