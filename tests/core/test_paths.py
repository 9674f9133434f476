from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import given, strategies as st

from slurmproxy.core.paths import canonical_path, check_query
from slurmproxy.errors import BadRequestError


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"/slurm/v0.0.38/jobs", "/slurm/v0.0.38/jobs"),
        (b"/slurm/v0.0.38/jobs/", "/slurm/v0.0.38/jobs/"),
        (b"/slurm/v0.0.38/job/%31%32", "/slurm/v0.0.38/job/12"),
        (b"/openapi.json", "/openapi.json"),
        (b"/", "/"),
    ],
)
def test_canonical(raw: bytes, expected: str) -> None:
    assert canonical_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"/slurm/v0.0.38/../v0.0.38/jobs", id="dotdot"),
        pytest.param(b"/slurm/v0.0.38/./jobs", id="dot"),
        pytest.param(b"/slurm/v0.0.38/%2e%2e/jobs", id="encoded-dotdot"),
        pytest.param(b"/slurm/v0.0.38/%2E%2E/jobs", id="encoded-dotdot-upper"),
        pytest.param(b"/slurm/v0.0.38/job%2Fsubmit", id="encoded-slash"),
        pytest.param(b"/slurm//v0.0.38/jobs", id="double-slash"),
        pytest.param(b"//slurm/v0.0.38/jobs", id="leading-double-slash"),
        pytest.param(b"/slurm/v0.0.38/jobs;x=1", id="semicolon"),
        pytest.param(b"/slurm/v0.0.38/jobs.", id="trailing-dot"),
        pytest.param(b"/slurm/v0.0.38\\jobs", id="backslash"),
        pytest.param(b"/slurm/v0.0.38/j\xc3\xb6bs", id="non-ascii"),
        pytest.param(b"/slurm/v0.0.38/jobs%00", id="nul"),
        pytest.param(b"/slurm/v0.0.38/jobs%", id="bad-escape"),
        pytest.param(b"/slurm/v0.0.38/jobs%2", id="short-escape"),
        pytest.param(b"/slurm/v0.0.38/%252e%252e/jobs", id="double-encoded"),
        pytest.param(b"slurm/v0.0.38/jobs", id="relative"),
        pytest.param(b"/" + b"a" * 3000, id="too-long"),
    ],
)
def test_refused(raw: bytes) -> None:
    with pytest.raises(BadRequestError) as err:
        canonical_path(raw)
    assert err.value.reason == "bad_path"


@given(st.binary(max_size=200))
def test_canonical_is_a_fixed_point_or_refused(raw: bytes) -> None:
    try:
        path = canonical_path(b"/" + raw)
    except BadRequestError:
        return
    assert canonical_path(path.encode()) == path
    segments = [s for s in path.split("/") if s]
    assert ".." not in segments and "." not in segments
    assert "%" not in path and "//" not in path


def test_query_must_be_printable_ascii() -> None:
    assert check_query(b"update_time=1&flags=x") == b"update_time=1&flags=x"
    with pytest.raises(BadRequestError):
        check_query(b"a=\r\nX-Injected: 1")


@pytest.mark.parametrize(
    "query",
    [
        pytest.param(b"access_token=eyJ.x.y", id="plain"),
        pytest.param(b"update_time=1&ACCESS_TOKEN=x", id="upper-case"),
        pytest.param(b"access%5Ftoken=x", id="encoded-name"),
        pytest.param(b"access_token", id="no-value"),
        pytest.param(b"update_time=1;access_token=eyJ.x.y", id="semicolon-separated"),  # issue 15, item 12
        pytest.param(b"a=1&b=2;ACCESS_TOKEN=x;c=3", id="semicolon-after-ampersand"),
    ],
)
def test_token_in_query_is_refused(query: bytes) -> None:
    with pytest.raises(BadRequestError) as err:
        check_query(query)
    assert err.value.reason == "token_in_query"
    assert b"eyJ" not in err.value.detail.encode()


def test_other_query_parameters_pass() -> None:
    assert check_query(b"token_type=x&my_access_token_note=1") == b"token_type=x&my_access_token_note=1"


_SAFE_SEGMENT = st.from_regex(r"[A-Za-z0-9_~\-][A-Za-z0-9._~\-]{0,10}", fullmatch=True).filter(
    lambda s: not s.endswith(".")
)


def _encode_some(text: str, mask: list[bool]) -> bytes:
    return "".join(f"%{ord(c):02{'X' if m else 'x'}}" if m else c for c, m in zip(text, mask, strict=False)).encode()


@given(st.lists(_SAFE_SEGMENT, min_size=1, max_size=6), st.data())
def test_percent_encoding_plain_characters_changes_nothing(segments: list[str], data: st.DataObject) -> None:
    path = "/" + "/".join(segments)
    mask = data.draw(st.lists(st.booleans(), min_size=len(path), max_size=len(path)))
    mask[0] = False  # the leading slash stays a slash
    for n, char in enumerate(path):
        if char == "/":
            mask[n] = False
    assert canonical_path(_encode_some(path, mask)) == path


_HOSTILE = st.lists(
    st.sampled_from(
        ["/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%00", "%25", ";", "\\", "%", "~", "a", "Z", "9"]
    )
    | st.sampled_from(["jobs", "ping", "slurm", "v0.0.40", "%c0%ae", "\u00e9", "%u002e"]),
    max_size=12,
)


@given(_HOSTILE)
def test_an_accepted_path_is_the_plain_decoding_of_safe_segments(parts: list[str]) -> None:
    raw = ("/" + "".join(parts)).encode()
    try:
        path = canonical_path(raw)
    except BadRequestError:
        return
    assert path == unquote(raw.decode("ascii"))  # what the policy checks is what slurmrestd would decode
    for segment in path.strip("/").split("/") if path != "/" else []:
        assert segment not in {"", ".", ".."} and not segment.endswith(".")
        assert all(c.isascii() and (c.isalnum() or c in "._~-") for c in segment)
