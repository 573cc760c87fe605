"""Request paths judged on their raw bytes; upstream paths built from the endpoint table."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import pytest

from budget.operations import match_endpoint
from gateway.paths import BadPath, checked_path, upstream_path


def scope(raw: bytes) -> dict[str, Any]:
    # What uvicorn puts in the scope: the raw bytes and their percent-decoding.
    return {"raw_path": raw, "path": unquote(raw.decode("latin-1"))}


@pytest.mark.parametrize(
    "raw",
    [
        b"/v1/models/%2e%2e/files",
        b"/v1/models/%2E%2e",
        b"/v1/models/..",
        b"/v1/models/./x",
        b"/v1/chat/completions/%2e",
        b"/v1/models/a%2Ffiles",
        b"/v1/models/a%2ffiles",
        b"/v1/models/a%5Cb",
        b"/v1/models/a\\b",
        b"/v1/models/a%252e",
        b"/v1/models/a%3Fb",
        b"/v1/models/a%23b",
        b"/v1/models/a%00b",
        b"/v1/models/a%0d%0ab",
        b"/v1/models/%ff",
        b"/v1/models/a%2",
        b"/v1//models",
        b"/v1/models/",
        b"//v1/models",
    ],
)
def test_ambiguous_paths_are_refused(raw: bytes) -> None:
    """Dot segments (raw or encoded), encoded slashes, double encodings, empty segments: 400."""
    with pytest.raises(BadPath) as caught:
        checked_path(scope(raw))
    assert caught.value.status == 400 and caught.value.code == "invalid_path"


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        (b"/v1/chat/completions", "/v1/chat/completions"),
        (b"/v1/models/gpt-4o-mini", "/v1/models/gpt-4o-mini"),
        (b"/v1/models/ft:gpt-4o-mini:acme::abc123", "/v1/models/ft:gpt-4o-mini:acme::abc123"),
        (b"/v1/models/ft%3Agpt-4o%3Aacme", "/v1/models/ft:gpt-4o:acme"),
        (b"/v1/models/gpt-4.1", "/v1/models/gpt-4.1"),
        (b"/v1/models/a..b", "/v1/models/a..b"),
        (b"/", "/"),
    ],
)
def test_plain_paths_pass(raw: bytes, decoded: str) -> None:
    """What the SDK sends (its segment-safe set, %XX of other characters) passes, decoded."""
    assert checked_path(scope(raw)) == decoded


def test_upstream_path_comes_from_the_template() -> None:
    """Parameters are escaped again: a decoded ':' or space cannot become something else."""
    match = match_endpoint("GET", "/v1/models/ft:a b")
    assert match is not None
    assert upstream_path(match) == "/models/ft:a%20b"
    static = match_endpoint("POST", "/v1/chat/completions")
    assert static is not None and upstream_path(static) == "/chat/completions"


def test_pages_of_the_gateway_may_end_in_a_slash() -> None:
    """The console lives at /console/; below /v1/ a trailing slash is refused."""
    assert checked_path(scope(b"/console/")) == "/console/"
    assert checked_path(scope(b"/console/a%20b/")) == "/console/a b/"
    with pytest.raises(BadPath):
        checked_path(scope(b"/console//"))
