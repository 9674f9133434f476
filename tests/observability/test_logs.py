from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_httpx import HTTPXMock

from slurmproxy.config.settings import LogSettings
from slurmproxy.observability.logs import configure_logging, request_id_var
from tests.asgi import app_client
from tests.fakeupstream import ThreadedFakeSlurmrestd as Upstream
from tests.helpers import UPSTREAM, Signer, make_settings, serve_keys

LOGGERS = ("slurmproxy", "uvicorn", "uvicorn.error")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    saved = {name: (lg.handlers[:], lg.level, lg.propagate) for name in LOGGERS for lg in [logging.getLogger(name)]}
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("json_format", [pytest.param(True, id="json"), pytest.param(False, id="plain")])
def test_lines_carry_the_request_id_only_inside_a_request(
    json_format: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(LogSettings(level="INFO", json=json_format))
    log = logging.getLogger("slurmproxy.test")
    log.info("outside %s", "any request")
    token = request_id_var.set("req-42")
    try:
        log.warning("inside")
    finally:
        request_id_var.reset(token)
    outside, inside = capsys.readouterr().err.splitlines()
    if json_format:
        assert json.loads(outside) == {**json.loads(outside), "level": "INFO", "message": "outside any request"}
        assert "request_id" not in json.loads(outside)
        assert json.loads(inside)["request_id"] == "req-42" and json.loads(inside)["logger"] == "slurmproxy.test"
    else:
        assert outside.endswith("outside any request") and inside.endswith("inside [req-42]")


@pytest.mark.anyio
@pytest.mark.usefixtures("restore_logging")
async def test_a_failed_request_is_logged_as_json_with_its_id_and_without_the_token(
    tmp_path: Path, httpx_mock: HTTPXMock, capsys: pytest.CaptureFixture[str], upstream: Upstream
) -> None:
    signer = serve_keys(httpx_mock, Signer())
    upstream.add_exception("hang", url=f"{UPSTREAM}/slurm/v0.0.40/ping")
    configure_logging(LogSettings(json=True))
    token = signer.token()
    headers = {"Authorization": f"Bearer {token}", "X-Request-ID": "slow-1"}
    async with app_client(make_settings(tmp_path, upstream={"timeout_seconds": 0.3})) as client:
        response = await client.get("/slurm/v0.0.40/ping", headers=headers)
    assert response.status_code == 504
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    (failure,) = [line for line in lines if line.get("request_id") == "slow-1" and line["level"] == "WARNING"]
    assert "upstream_timeout" in failure["message"]
    assert token not in json.dumps(lines) and token.split(".")[2] not in json.dumps(lines)
