"""Request path canonicalisation: the path the policy checks is exactly the path slurmrestd gets.

slurmrestd paths need nothing beyond ``[A-Za-z0-9._~-]`` segments. Percent-encodings of those
characters are decoded; any other encoding (``%2F``, ``%00``, ``%5C``, …), empty segments (``//``),
dot segments (``.``, ``..``, also encoded), segments ending in a dot, ``;`` parameters, backslashes
and non-ASCII bytes are refused with 400 rather than interpreted.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

from slurmproxy.errors import BadRequestError

MAX_PATH_BYTES = 2048
_SEGMENT = re.compile(r"[A-Za-z0-9_~\-][A-Za-z0-9._~\-]*")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_QUERY_OK = re.compile(rb"[\x21-\x7e]*")
# RFC 6750 §2.3: a bearer token in the URI query. Never accepted, and refused rather than forwarded:
# slurmrestd and anything between would log it.
TOKEN_PARAMETERS = frozenset({"access_token"})


def _decode_unreserved(raw: bytes) -> bytes:
    def one(match: re.Match[bytes]) -> bytes:
        byte = int(match.group(1), 16)
        if byte not in _UNRESERVED:
            raise BadRequestError(
                "the path contains an encoded character that slurmrestd paths never need", reason="bad_path"
            )
        return bytes([byte])

    if b"%" not in raw:
        return raw
    decoded = _ESCAPE.sub(one, raw)
    if b"%" in decoded:
        raise BadRequestError("the path contains a malformed percent-encoding", reason="bad_path")
    return decoded


def canonical_path(raw: bytes) -> str:
    if len(raw) > MAX_PATH_BYTES:
        raise BadRequestError("the path is too long", reason="bad_path")
    if not raw.startswith(b"/"):
        raise BadRequestError("the path must start with '/'", reason="bad_path")
    decoded = _decode_unreserved(raw)
    try:
        path = decoded.decode("ascii")
    except UnicodeDecodeError as exc:
        raise BadRequestError("the path is not ASCII", reason="bad_path") from exc
    if path == "/":
        return path
    segments = path[1:].split("/")
    if segments[-1] == "":
        segments.pop()
    for segment in segments:
        if not _SEGMENT.fullmatch(segment) or segment.endswith("."):
            raise BadRequestError("the path has an empty, dot, or otherwise invalid segment", reason="bad_path")
    return path


def check_query(query: bytes) -> bytes:
    if not _QUERY_OK.fullmatch(query):
        raise BadRequestError("the query string has characters that are not printable ASCII", reason="bad_query")
    # Both separators: `;` separated parameters in HTML 4 and still does in many query parsers.
    for part in re.split(rb"[&;]", query):
        name = unquote_plus(part.split(b"=", 1)[0].decode("ascii")).strip().lower()
        if name in TOKEN_PARAMETERS:
            raise BadRequestError(
                "a token in the query string is never accepted; send it in the Authorization header",
                reason="token_in_query",
            )
    return query
