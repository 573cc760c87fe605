"""Upstream error bodies as the client may see them: OpenAI's shape, no key material.

OpenAI's error messages quote what they were sent: "Incorrect API key
provided: sk-proj-****abcd" is about the gateway's own key, and a front
proxy's error page may echo request headers. The client gets the error's
`message`, `type`, `code` and `param` (the shape the SDKs read), with
anything that looks like a credential replaced, and nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

# What a credential looks like in a message: OpenAI and Stripe key prefixes
# (sk-, sk-proj-, rk_, pk_, whsec_), the gateway's own keys (aza_), a bearer
# header, and any long unbroken token (40+ characters: keys, secrets, JWTs;
# ids such as "req_…" or "file-…" stay shorter).
_SECRET_PATTERN = re.compile(
    r"(?i)\b(?:sk|rk|pk)[-_][A-Za-z0-9*_\-]{4,}"
    r"|\bwhsec_[A-Za-z0-9*_\-]+"
    r"|\baza_[A-Za-z0-9*_\-]{4,}"
    r"|\bbearer\s+\S+"
    r"|[A-Za-z0-9+/=_\-*]{40,}"
)
REDACTED = "[redacted]"
# More than any OpenAI error body; a larger one is cut there before parsing.
MAX_ERROR_BODY_BYTES = 64 * 1024


def redact(text: str, known: Iterable[str] = ()) -> str:
    """`text` with every known secret and every key-like token replaced by "[redacted]"."""
    for secret in known:
        if secret:
            text = text.replace(secret, REDACTED)
    return _SECRET_PATTERN.sub(REDACTED, text)


def _text_or_none(value: Any, known: Iterable[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return redact(str(value), known)[:1000]


def client_error_body(status: int, body: bytes, known: Iterable[str] = ()) -> bytes:
    """The JSON error body to send the client for an upstream error answer of `status`.

    An OpenAI-shaped body keeps its four fields, redacted; anything else
    becomes a gateway message naming the status.
    """
    known = tuple(known)
    try:
        data = json.loads(body[:MAX_ERROR_BODY_BYTES])
    except (ValueError, RecursionError):
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        shaped = {
            "message": redact(error["message"], known)[:4000],
            "type": _text_or_none(error.get("type"), known),
            "code": _text_or_none(error.get("code"), known),
            "param": _text_or_none(error.get("param"), known),
        }
    else:
        shaped = {
            "message": f"The upstream API answered HTTP {status}.",
            "type": "server_error" if status >= 500 else "invalid_request_error",
            "code": "upstream_error",
            "param": None,
        }
    return json.dumps({"error": shaped}, separators=(",", ":")).encode()
