"""JSON bodies for the proxy's own answers, in slurmrestd's ``errors`` shape so its clients parse them."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from slurmproxy import __version__
from slurmproxy.errors import ProxyError

JSON = "application/json"


def error_body(status: int, reason: str, detail: str, request_id: str) -> dict[str, Any]:
    return {
        "errors": [
            {"error": detail, "error_number": status, "description": f"slurmproxy: {reason}", "source": "slurmproxy"}
        ],
        "warnings": [],
        "meta": {"plugin": {"type": "slurmproxy", "name": "slurmproxy", "version": __version__}},
        "slurmproxy": {"status": status, "reason": reason, "request_id": request_id},
    }


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")).encode(), status_code=status, headers=headers, media_type=JSON
    )


def error_response(error: ProxyError, request_id: str) -> Response:
    headers = dict(error.headers)
    headers["x-request-id"] = request_id
    body = error_body(error.status_code, error.reason, error.detail, request_id)
    body["slurmproxy"].update(error.fields)
    return json_response(body, error.status_code, headers)
