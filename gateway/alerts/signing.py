"""Webhook signatures, made like Stripe's: `AzA-Signature: t=<unix>,v1=<hex>`.

`v1` is the hex HMAC-SHA256, keyed with the practice's webhook secret, of
`"<t>.<body>"`, the exact bytes sent. A receiver recomputes it and compares in
constant time, and rejects a `t` too far from its own clock (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SIGNATURE_HEADER = "AzA-Signature"
SECRET_PREFIX = "whsec_aza_"


def new_webhook_secret() -> str:
    """A fresh signing secret (256 bits), shown to the practice admin once."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The header value for `body` signed at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str, header: str, body: bytes, *, now: int, tolerance_seconds: int = 300
) -> bool:
    """True when `header` signs `body` with `secret` within `tolerance_seconds` of `now`."""
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        timestamp = int(parts.get("t", ""))
    except ValueError:
        return False
    if abs(now - timestamp) > tolerance_seconds:
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))
