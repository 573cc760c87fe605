"""Per-key and per-device limits at the gate: rate windows, caps, and the 429s they answer.

`admit_limits` runs in the gate for a caller whose key, or whose
`X-Device-Id`, has limits (a key without any costs nothing here: its limits
came with the cached key lookup). Rate limits are counted first, then the
practice's budget is reserved as always, then the cap's hold is placed;
`settle_limits` and `release_limits` finish the caps after the response.

Over a cap: HTTP 429 `insufficient_quota` with `x-should-retry: false`, as
the budget (waiting will not help). Over a rate limit: HTTP 429
`rate_limit_exceeded` with `retry-after` (and `retry-after-ms`), which the
official SDKs wait for and retry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from budget.limits import Scope, Subject, counted_tokens, window_at
from budget.usage import Usage
from gateway.auth import Caller
from gateway.errors import GatewayError
from gateway.limit_leases import LimitLeases
from gateway.storage.holds import Hold, until_written
from gateway.storage.limits import CapHold, LimitStore

log = logging.getLogger("aza.gateway.limits")

KEY_CAP_REACHED = "KEY_SPENDING_CAP_REACHED"
DEVICE_CAP_REACHED = "DEVICE_SPENDING_CAP_REACHED"
KEY_RATE_LIMITED = "KEY_RATE_LIMITED"
DEVICE_RATE_LIMITED = "DEVICE_RATE_LIMITED"

_USER: dict[str, dict[str, str]] = {
    KEY_CAP_REACHED: {
        "de": "Dieser Zugang hat sein monatliches KI-Ausgabenlimit erreicht. Eine Person mit "
        "Adminrechten Ihrer Praxis kann das Limit im Adminbereich erhöhen.",
        "fr": "Cet accès a atteint son plafond mensuel de dépenses IA. Un administrateur de "
        "votre cabinet peut relever le plafond dans l'espace d'administration.",
        "it": "Questo accesso ha raggiunto il suo limite mensile di spesa IA. Un amministratore "
        "del vostro studio può aumentare il limite nell'area di amministrazione.",
        "en": "This access has reached its monthly AI spending cap. An admin of your practice "
        "can raise the cap in the admin area.",
    },
    DEVICE_CAP_REACHED: {
        "de": "Dieses Gerät hat sein monatliches KI-Ausgabenlimit erreicht. Eine Person mit "
        "Adminrechten Ihrer Praxis kann das Limit im Adminbereich erhöhen.",
        "fr": "Cet appareil a atteint son plafond mensuel de dépenses IA. Un administrateur de "
        "votre cabinet peut relever le plafond dans l'espace d'administration.",
        "it": "Questo dispositivo ha raggiunto il suo limite mensile di spesa IA. Un "
        "amministratore del vostro studio può aumentare il limite nell'area di amministrazione.",
        "en": "This device has reached its monthly AI spending cap. An admin of your practice "
        "can raise the cap in the admin area.",
    },
    KEY_RATE_LIMITED: {
        "de": "Zu viele KI-Anfragen in kurzer Zeit über diesen Zugang. Bitte einen Moment "
        "warten; die Anfrage wird gleich wiederholt.",
        "fr": "Trop de requêtes IA en peu de temps via cet accès. Veuillez patienter un "
        "instant ; la requête sera bientôt renvoyée.",
        "it": "Troppe richieste IA in poco tempo tramite questo accesso. Attendete un momento; "
        "la richiesta verrà ripetuta a breve.",
        "en": "Too many AI requests in a short time through this access. Please wait a moment; "
        "the request will be retried shortly.",
    },
    DEVICE_RATE_LIMITED: {
        "de": "Zu viele KI-Anfragen in kurzer Zeit von diesem Gerät. Bitte einen Moment "
        "warten; die Anfrage wird gleich wiederholt.",
        "fr": "Trop de requêtes IA en peu de temps depuis cet appareil. Veuillez patienter un "
        "instant ; la requête sera bientôt renvoyée.",
        "it": "Troppe richieste IA in poco tempo da questo dispositivo. Attendete un momento; "
        "la richiesta verrà ripetuta a breve.",
        "en": "Too many AI requests in a short time from this device. Please wait a moment; "
        "the request will be retried shortly.",
    },
}


def limit_message_user(error_code: str, language: str) -> str:
    """The sentence a practice member reads for a limit's `error_code` (de, fr, it, en)."""
    texts = _USER[error_code]
    return texts.get(language, texts["de"])


def subjects_of(caller: Caller, device_limits: Subject | None) -> list[Subject]:
    """The caller's key and device that have limits (the key's came with the key lookup)."""
    found = []
    key = caller.key
    if key is not None and key.limits is not None and key.key_prefix is not None:
        found.append(Subject(key.practice_id, Scope.KEY, key.key_prefix, key.limits))
    if device_limits is not None:
        found.append(device_limits)
    return found


async def device_subject(limits: LimitStore, caller: Caller, practice_id: str) -> Subject | None:
    """The caller's device with its limits, when the practice limits devices at all."""
    key = caller.key
    if caller.device_id is None or key is None or not key.device_limits:
        return None
    found = await limits.device_limits(practice_id, caller.device_id)
    return None if found is None else Subject(practice_id, Scope.DEVICE, caller.device_id, found)


def rate_limited(subject: Subject, retry_after_ms: int, language: str) -> GatewayError:
    code = KEY_RATE_LIMITED if subject.scope is Scope.KEY else DEVICE_RATE_LIMITED
    what = "key" if subject.scope is Scope.KEY else "device"
    seconds = max(1, -(-retry_after_ms // 1000))
    return GatewayError(
        429,
        f"Rate limit of this {what} reached (requests or tokens per minute); "
        f"retry after {seconds} s.",
        type="requests",
        code="rate_limit_exceeded",
        error_code=code,
        message_user=limit_message_user(code, language),
        headers={
            "retry-after": str(seconds),
            "retry-after-ms": str(max(1, retry_after_ms)),
            "x-should-retry": "true",
        },
    )


def cap_reached(subject: Subject, language: str) -> GatewayError:
    code = KEY_CAP_REACHED if subject.scope is Scope.KEY else DEVICE_CAP_REACHED
    what = "key" if subject.scope is Scope.KEY else "device"
    return GatewayError(
        429,
        f"The monthly spending cap of this {what} is reached.",
        type="insufficient_quota",
        code="insufficient_quota",
        error_code=code,
        message_user=limit_message_user(code, language),
        # Waiting will not bring the cap back (the official SDKs would retry a 429).
        headers={"x-should-retry": "false"},
    )


async def take_rates(
    limits: LimitLeases, subjects: list[Subject], estimate: Usage, *, window_seconds: float
) -> tuple[Subject, int] | None:
    """Count the request in each subject's rate window; the first full one (and the
    milliseconds until its next window), or None when every window had room."""
    window_ms = max(1, int(window_seconds * 1000))
    tokens = counted_tokens(estimate)
    for subject in subjects:
        if not subject.limits.rate_limited:
            continue
        window = window_at(int(time.time() * 1000), window_ms)
        if not await limits.take_rate(subject, tokens=tokens, window=window):
            return subject, window.left_ms
    return None


async def hold_caps(
    limits: LimitLeases, subjects: list[Subject], hold: Hold, estimate_micros: int
) -> tuple[list[CapHold], Subject | None]:
    """Place the estimate against each capped subject's cap. On a full one, the ones
    placed are released and that subject is returned (the caller releases the budget's
    hold and answers 429)."""
    placed: list[CapHold] = []
    for subject in subjects:
        if subject.limits.monthly_cap_micros is None:
            continue
        cap = await limits.hold_cap(
            subject,
            hold_id=hold.request_id,
            estimate_micros=estimate_micros,
            period_start=hold.period.start,
        )
        if cap is None:
            await release_limits(limits, placed)
            return [], subject
        placed.append(cap)
    return placed, None


async def settle_limits(
    limits: LimitLeases, caps: Sequence[CapHold], cost_micros: int, *, retry_seconds: float
) -> None:
    """Replace each cap's hold with the cost, retrying while the database is away (a
    lease's share adds its cost to the lease, written when it closes)."""
    for cap in caps:
        if limits.done(cap, cost_micros):
            continue
        try:
            await until_written(
                f"settling the cap of {cap.subject.scope} {cap.subject.name}",
                lambda cap=cap: limits.store.settle_cap(cap, cost_micros),  # type: ignore[misc]
                retry_seconds,
            )
        except Exception:
            log.exception("settling the cap of %s %s failed", cap.subject.scope, cap.subject.name)


async def release_limits(limits: LimitLeases, caps: Sequence[CapHold]) -> None:
    """Drop each cap's hold (its row expires by itself if this fails)."""
    for cap in caps:
        if limits.done(cap, None):
            continue
        try:
            await limits.store.release_cap(cap)
        except Exception:
            log.exception("releasing the cap of %s %s failed", cap.subject.scope, cap.subject.name)
