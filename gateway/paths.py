"""Request paths the gateway will look at, and upstream paths built from the endpoint table.

A path is judged on the bytes the client sent (`raw_path`), before any
route is matched, so that "the same path" means the same thing here, in a
front proxy and at the upstream:

- every segment is made of the characters RFC 3986 allows in a segment
  (what the OpenAI SDK's `path_template` leaves unescaped) or %XX escapes;
- no segment is empty (`//`; a trailing `/` below `/v1/`), and none is `.` or `..`, raw
  or percent-encoded (`%2e%2e`), so no one in between can resolve it away;
- no escape decodes to `/`, `\\`, `%` (a double encoding), `?`, `#` or a
  control character, so a segment stays one segment wherever it is decoded.

The upstream target is then built from the matched endpoint's template and
its parameters, each escaped again, never from the client's path
(`upstream_path`).
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

from starlette.types import Scope

from budget.operations import Match
from gateway.errors import GatewayError

# A path segment as the SDK writes it: unreserved, sub-delims, ':' and '@', or %XX.
_SEGMENT = re.compile(rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})+")
# The characters `quote` leaves in a parameter (the SDK's segment-safe set).
_PARAM_SAFE = "!$&'()*+,;=:@"
# Bytes whose presence sends a path through the full check; paths of the hot
# path (POST /v1/chat/completions and the like) contain none of them.
_SUSPECT = (b"%", b"/.", b"//", b"\\")


class BadPath(GatewayError):
    """A request path the gateway refuses to interpret (HTTP 400)."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            400,
            f"Invalid request path: {reason}.",
            type="invalid_request_error",
            code="invalid_path",
        )


def checked_path(scope: Scope) -> str:
    """The request's decoded path, or BadPath when its raw form is ambiguous (see module doc)."""
    raw: bytes | None = scope.get("raw_path")
    path: str = scope["path"]
    if raw is None:
        raw = path.encode("utf-8")
    if not any(marker in raw for marker in _SUSPECT) and not raw.endswith(b"/"):
        return path
    return _decode_strictly(raw)


def _decode_strictly(raw: bytes) -> str:
    if raw == b"/":
        return "/"
    if not raw.startswith(b"/"):
        raise BadPath("it must start with '/'")
    segments = raw[1:].split(b"/")
    # A page of the gateway's own may end in "/" (the console, /console/);
    # an OpenAI API path never does.
    trailing = not segments[-1] and not raw.startswith(b"/v1/")
    if trailing:
        segments.pop()
    decoded: list[str] = []
    for segment in segments:
        if not segment:
            raise BadPath("empty path segment")
        if _SEGMENT.fullmatch(segment) is None:
            raise BadPath("a character that must be percent-encoded")
        try:
            text = unquote(segment.decode("ascii"), errors="strict")
        except UnicodeDecodeError:
            raise BadPath("an escape that is not UTF-8") from None
        if text in (".", ".."):
            raise BadPath("dot segment")
        if any(c in "/\\%?#" or not c.isprintable() for c in text):
            raise BadPath("an encoded '/', '\\', '%', '?', '#' or control character")
        decoded.append(text)
    return "/" + "/".join(decoded) + ("/" if trailing else "")


def upstream_path(match: Match) -> str:
    """The matched endpoint's path below `/v1`, parameters escaped again (never the client's)."""
    template = match.endpoint.template
    if match.endpoint.is_static:
        return template[len("/v1") :]
    parts = []
    for segment in template.split("/"):
        if segment.startswith("{"):
            segment = quote(match.params[segment[1:-1]], safe=_PARAM_SAFE)
        parts.append(segment)
    return "/".join(parts)[len("/v1") :]
