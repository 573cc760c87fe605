"""Stripe object ids: normalising what webhooks hand us, masking what people see."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def normalize_stripe_id(value: Any, prefix: str) -> str | None:
    """The id (starting with `prefix`, e.g. "pm_") inside `value`, or None.

    Webhook payloads carry references as a bare id, an expanded object (a
    dict or a Stripe object with `.id`), or, from some integrations, that
    object serialised to a JSON string. Whatever the form, the stored value
    is the bare id, never the serialised object.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except ValueError:
                return None
            return normalize_stripe_id(parsed, prefix) if isinstance(parsed, dict) else None
        return text if text.startswith(prefix) and len(text) > len(prefix) else None
    if isinstance(value, Mapping):
        return normalize_stripe_id(value.get("id"), prefix)
    inner = getattr(value, "id", None)
    return normalize_stripe_id(inner, prefix) if isinstance(inner, str) else None


def mask_stripe_reference(ref: str | None) -> str | None:
    """A Stripe id shown to people: its type prefix and 4 characters, the rest hidden.

    "pi_1234567890abcdef" → "pi_1234…". Enough to match a receipt by eye,
    too little to use or guess the id.
    """
    if not ref:
        return None
    parts = ref.split("_")
    keep = 1 if len(parts) > 1 else 0
    if len(parts) > 2 and parts[1] in ("test", "live"):
        keep = 2  # cs_test_…, cs_live_…
    prefix = "".join(p + "_" for p in parts[:keep])
    tail = ref[len(prefix) :]
    return f"{prefix}{tail[:4]}…"
