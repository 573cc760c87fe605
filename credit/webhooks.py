"""Stripe webhooks: verified, processed once, crediting once.

- The signature is checked against the raw body (Stripe's scheme, 5 minute
  tolerance) before anything is parsed or written.
- Each event is processed once: its id goes into `stripe_webhook_events` in
  the same transaction as its effects. When a handler fails, the transaction
  rolls back, the id is not recorded, and Stripe's retry finds a clean state.
- Each credit happens once, keyed by its Stripe object: a checkout session's
  credit also carries its PaymentIntent id, so `checkout.session.completed`
  and `payment_intent.succeeded` for one payment credit once in either order
  (checked under the practice's lock, backed by the schema's unique indexes).
- Stripe API calls a handler needs (retrieving a SetupIntent) happen before
  the transaction opens, never inside it.
- Subscription events keep the newest state: a license row remembers the
  `created` time of the event it last applied, and an older event, which
  Stripe may deliver late or retry, changes nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import stripe as stripe_lib

from credit.autotopup import pause
from credit.checkout import PURPOSE_AUTO_TOPUP, PURPOSE_SETUP, PURPOSE_TOPUP
from credit.config import CreditConfigLike
from credit.errors import CreditError, WebhookSignatureError
from credit.ledger import (
    EventType,
    LedgerEntry,
    NewEntry,
    Status,
    fail_pending,
    find_purchase,
    get_entry,
    insert_entry,
    settle_pending,
    stripe_object_filter,
)
from credit.licenses import (
    FINAL_SUBSCRIPTION_STATUSES,
    LicenseWrite,
    practice_of_subscription,
    write_license,
)
from credit.money import InvalidAmount, chf_to_rappen, parse_chf, parse_usd, refund_share_micros
from credit.money import usd_to_micros as _usd_to_micros
from credit.policy import ERROR_CODES, Reason
from credit.ports import Connection, Database, UniqueViolation
from credit.stripe_ids import normalize_stripe_id
from credit.stripe_port import SetupIntentResult, StripePort, StripeRequestFailed
from credit.topup_settings import load_settings, save_settings

log = logging.getLogger("credit.webhooks")

SIGNATURE_TOLERANCE_SECONDS = 300
SETUP_INCOMPLETE = "AUTO_TOPUP_SETUP_INCOMPLETE"


@dataclass(frozen=True, slots=True)
class HandlerResult:
    """What handling one Stripe object did."""

    handled: bool
    credited: bool = False
    duplicate: bool = False
    reason: str | None = None
    ledger_id: int | None = None
    auto_topup_enabled: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "handled": self.handled,
            "credited": self.credited,
            "duplicate": self.duplicate,
            "reason": self.reason,
            "ledger_id": self.ledger_id,
            "auto_topup_enabled": self.auto_topup_enabled,
        }


IGNORED = HandlerResult(handled=False, reason="ignored")


def _get(obj: Any, key: str) -> Any:
    """`obj[key]` for dicts, JSON strings of dicts and objects with attributes; else None."""
    if obj is None:
        return None
    if isinstance(obj, str):
        if not obj.strip().startswith("{"):
            return None
        try:
            obj = json.loads(obj)
        except ValueError:
            return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _metadata(obj: Any) -> dict[str, str]:
    raw = _get(obj, "metadata")
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): str(v) for k, v in raw.items() if v is not None}


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class TopupMeta:
    """The metadata our checkout and PaymentIntents carry, parsed exactly."""

    practice_id: str
    subscription_id: str | None
    credit_micros: int
    paid_rappen: int


def parse_topup_meta(metadata: Mapping[str, str]) -> TopupMeta | None:
    """Practice, credit and price from Stripe metadata; None when any is missing or invalid."""
    practice_id = (metadata.get("practice_id") or "").strip()
    if not practice_id:
        return None
    try:
        credit = parse_usd(metadata.get("internal_credit_usd", ""), what="internal_credit_usd")
        paid = parse_chf(metadata.get("paid_chf", ""), what="paid_chf")
    except InvalidAmount:
        return None
    if credit <= 0 or paid <= 0:
        return None
    return TopupMeta(
        practice_id=practice_id,
        subscription_id=(metadata.get("subscription_id") or None),
        credit_micros=_usd_to_micros(credit),
        paid_rappen=chf_to_rappen(paid),
    )


# -- manual top-ups --------------------------------------------------------------


async def _record_failed_purchase(
    conn: Connection,
    meta: TopupMeta,
    *,
    reason: str,
    checkout_session_id: str | None,
    payment_intent_id: str | None,
    event_id: str | None,
    now: int,
) -> HandlerResult:
    """A failed manual top-up attempt (amount 0), once per Stripe object."""
    found = stripe_object_filter(checkout_session_id, payment_intent_id)
    if found is not None:
        where, args = found
        known = await conn.fetchval(
            f"SELECT id FROM ai_credit_ledger WHERE {where} "
            "AND event_type = ? AND status = 'failed' LIMIT 1",
            *args,
            EventType.TOPUP_PURCHASE.value,
        )
        if known is not None:
            return HandlerResult(handled=True, duplicate=True, reason=reason, ledger_id=int(known))
    ledger_id = await insert_entry(
        conn,
        NewEntry(
            practice_id=meta.practice_id,
            event_type=EventType.TOPUP_PURCHASE,
            status=Status.FAILED,
            amount_micros=0,
            paid_rappen=meta.paid_rappen,
            subscription_id=meta.subscription_id,
            checkout_session_id=checkout_session_id,
            payment_intent_id=payment_intent_id,
            event_id=event_id,
            meta={"aza_purpose": PURPOSE_TOPUP, "failure_reason": reason},
        ),
        now=now,
    )
    log.info("top-up not credited (%s), ledger %s", reason, ledger_id)
    return HandlerResult(handled=True, reason=reason, ledger_id=ledger_id)


def _paid_mismatch(
    meta: TopupMeta, paid_rappen: Any, currency: Any, want_currency: str
) -> str | None:
    """Why Stripe's amount does not match the metadata, or None when it does (or is absent)."""
    amount = _int_or_none(paid_rappen)
    if amount is not None and amount != meta.paid_rappen:
        return "amount_mismatch"
    if currency is not None and str(currency).lower() != want_currency.lower():
        return "currency_mismatch"
    return None


async def _credit_purchase(
    conn: Connection,
    meta: TopupMeta,
    *,
    event_type: EventType,
    checkout_session_id: str | None,
    payment_intent_id: str | None,
    event_id: str | None,
    now: int,
) -> HandlerResult:
    existing = await find_purchase(
        conn, checkout_session_id=checkout_session_id, payment_intent_id=payment_intent_id
    )
    if existing is not None:
        await _complete_references(conn, existing, checkout_session_id, payment_intent_id, now)
        return HandlerResult(handled=True, duplicate=True, ledger_id=existing.id)
    ledger_id = await insert_entry(
        conn,
        NewEntry(
            practice_id=meta.practice_id,
            event_type=event_type,
            status=Status.SUCCEEDED,
            amount_micros=meta.credit_micros,
            paid_rappen=meta.paid_rappen,
            subscription_id=meta.subscription_id,
            checkout_session_id=checkout_session_id,
            payment_intent_id=payment_intent_id,
            event_id=event_id,
            meta={
                "aza_purpose": PURPOSE_TOPUP
                if event_type is EventType.TOPUP_PURCHASE
                else PURPOSE_AUTO_TOPUP
            },
        ),
        now=now,
    )
    return HandlerResult(handled=True, credited=True, ledger_id=ledger_id)


async def _complete_references(
    conn: Connection,
    entry: LedgerEntry,
    checkout_session_id: str | None,
    payment_intent_id: str | None,
    now: int,
) -> None:
    """Fill in the Stripe id the first event for a payment did not know."""
    if checkout_session_id and not entry.checkout_session_id:
        await conn.execute(
            "UPDATE ai_credit_ledger SET stripe_checkout_session_id = ?, updated_at = ? "
            "WHERE id = ?",
            checkout_session_id,
            now,
            entry.id,
        )
    if payment_intent_id and not entry.payment_intent_id:
        await conn.execute(
            "UPDATE ai_credit_ledger SET stripe_payment_intent_id = ?, updated_at = ? WHERE id = ?",
            payment_intent_id,
            now,
            entry.id,
        )


async def process_topup_checkout_completed(
    conn: Connection,
    session: Mapping[str, Any],
    *,
    now: int,
    event_id: str | None = None,
    currency: str = "chf",
) -> HandlerResult:
    """Credit a paid top-up Checkout Session once; an unpaid one is recorded as failed."""
    meta = parse_topup_meta(_metadata(session))
    cs_id = normalize_stripe_id(session.get("id"), "cs_")
    if meta is None or cs_id is None:
        log.warning("top-up checkout session without valid metadata ignored")
        return HandlerResult(handled=False, reason="invalid_metadata")
    pi_id = normalize_stripe_id(session.get("payment_intent"), "pi_")
    existing = await find_purchase(conn, checkout_session_id=cs_id, payment_intent_id=pi_id)
    if existing is not None:
        await _complete_references(conn, existing, cs_id, pi_id, now)
        return HandlerResult(handled=True, duplicate=True, ledger_id=existing.id)
    status = str(session.get("payment_status") or "")
    mismatch = _paid_mismatch(meta, session.get("amount_total"), session.get("currency"), currency)
    unpaid = None if status in ("paid", "no_payment_required") else status or "unknown"
    failure = mismatch or (f"payment_status_{unpaid}" if unpaid else None)
    return await _book_manual_topup(
        conn,
        meta,
        failure=failure,
        checkout_session_id=cs_id,
        payment_intent_id=pi_id,
        event_id=event_id,
        now=now,
    )


async def process_topup_payment_intent_succeeded(
    conn: Connection,
    payment_intent: Mapping[str, Any],
    *,
    now: int,
    event_id: str | None = None,
    currency: str = "chf",
) -> HandlerResult:
    """Credit a manual top-up's PaymentIntent once (deduplicated with its checkout session)."""
    meta = parse_topup_meta(_metadata(payment_intent))
    pi_id = normalize_stripe_id(payment_intent.get("id"), "pi_")
    if meta is None or pi_id is None:
        return HandlerResult(handled=False, reason="invalid_metadata")
    existing = await find_purchase(conn, payment_intent_id=pi_id)
    if existing is not None:
        return HandlerResult(handled=True, duplicate=True, ledger_id=existing.id)
    mismatch = _paid_mismatch(
        meta, payment_intent.get("amount_received"), payment_intent.get("currency"), currency
    )
    return await _book_manual_topup(
        conn,
        meta,
        failure=mismatch,
        checkout_session_id=None,
        payment_intent_id=pi_id,
        event_id=event_id,
        now=now,
    )


async def _book_manual_topup(
    conn: Connection,
    meta: TopupMeta,
    *,
    failure: str | None,
    checkout_session_id: str | None,
    payment_intent_id: str | None,
    event_id: str | None,
    now: int,
) -> HandlerResult:
    """Book a manual top-up payment: credited, or recorded as failed with `failure` as reason."""
    if failure:
        return await _record_failed_purchase(
            conn,
            meta,
            reason=failure,
            checkout_session_id=checkout_session_id,
            payment_intent_id=payment_intent_id,
            event_id=event_id,
            now=now,
        )
    return await _credit_purchase(
        conn,
        meta,
        event_type=EventType.TOPUP_PURCHASE,
        checkout_session_id=checkout_session_id,
        payment_intent_id=payment_intent_id,
        event_id=event_id,
        now=now,
    )


# -- automatic top-ups -------------------------------------------------------------


async def _pending_for(
    conn: Connection, payment_intent: Mapping[str, Any], practice_id: str
) -> LedgerEntry | None:
    """The pending automatic top-up this PaymentIntent pays (by our ledger id, or its id)."""
    ledger_id = _int_or_none(_metadata(payment_intent).get("aza_ledger_id"))
    if ledger_id is not None:
        entry = await get_entry(conn, ledger_id)
        if entry is not None and entry.practice_id == practice_id:
            return entry
    pi_id = normalize_stripe_id(payment_intent.get("id"), "pi_")
    if pi_id is None:
        return None
    value = await conn.fetchval(
        "SELECT id FROM ai_credit_ledger WHERE stripe_payment_intent_id = ? AND status = 'pending'",
        pi_id,
    )
    return None if value is None else await get_entry(conn, int(value))


async def process_auto_topup_payment_intent_succeeded(
    conn: Connection,
    payment_intent: Mapping[str, Any],
    *,
    now: int,
    event_id: str | None = None,
    currency: str = "chf",
) -> HandlerResult:
    """Credit an automatic top-up's PaymentIntent once (settling its pending entry if any)."""
    meta = parse_topup_meta(_metadata(payment_intent))
    pi_id = normalize_stripe_id(payment_intent.get("id"), "pi_")
    if meta is None or pi_id is None:
        return HandlerResult(handled=False, reason="invalid_metadata")
    existing = await find_purchase(conn, payment_intent_id=pi_id)
    # Unlike a manual top-up's, a pending entry is no duplicate: this event settles it.
    if existing is not None and existing.status == Status.SUCCEEDED:
        return HandlerResult(handled=True, duplicate=True, ledger_id=existing.id)
    pending = await _pending_for(conn, payment_intent, meta.practice_id)
    received = _int_or_none(payment_intent.get("amount_received"))
    if pending is not None and pending.status == Status.PENDING:
        if received is not None and received != pending.paid_rappen:
            await fail_pending(
                conn, pending.id, payment_intent_id=pi_id, reason="amount_mismatch", now=now
            )
            return HandlerResult(handled=True, reason="amount_mismatch", ledger_id=pending.id)
        await settle_pending(conn, pending.id, payment_intent_id=pi_id, event_id=event_id, now=now)
        return HandlerResult(handled=True, credited=True, ledger_id=pending.id)
    if pending is not None and pending.status == Status.SUCCEEDED:
        return HandlerResult(handled=True, duplicate=True, ledger_id=pending.id)
    mismatch = _paid_mismatch(meta, received, payment_intent.get("currency"), currency)
    if mismatch:
        ledger_id = await insert_entry(
            conn,
            NewEntry(
                practice_id=meta.practice_id,
                event_type=EventType.FAILED_AUTO_TOPUP,
                status=Status.FAILED,
                paid_rappen=meta.paid_rappen,
                subscription_id=meta.subscription_id,
                payment_intent_id=pi_id,
                event_id=event_id,
                meta={"aza_purpose": PURPOSE_AUTO_TOPUP, "failure_reason": mismatch},
            ),
            now=now,
        )
        return HandlerResult(handled=True, reason=mismatch, ledger_id=ledger_id)
    return await _credit_purchase(
        conn,
        meta,
        event_type=EventType.AUTO_TOPUP_PURCHASE,
        checkout_session_id=None,
        payment_intent_id=pi_id,
        event_id=event_id,
        now=now,
    )


async def process_auto_topup_payment_failed(
    conn: Connection,
    payment_intent: Mapping[str, Any],
    *,
    now: int,
    config: CreditConfigLike,
) -> HandlerResult:
    """Fail the pending automatic top-up this PaymentIntent was for, and pause auto top-up."""
    practice_id = _metadata(payment_intent).get("practice_id") or ""
    pending = await _pending_for(conn, payment_intent, practice_id)
    if pending is None or pending.status != Status.PENDING:
        return HandlerResult(handled=True, reason="no_pending_entry")
    error = _get(payment_intent, "last_payment_error")
    code = _get(error, "decline_code") or _get(error, "code")
    reason = (
        Reason.REQUIRES_ACTION
        if code == "authentication_required" or payment_intent.get("status") == "requires_action"
        else Reason.PAYMENT_FAILED
    )
    pi_id = normalize_stripe_id(payment_intent.get("id"), "pi_")
    if await fail_pending(conn, pending.id, payment_intent_id=pi_id, reason=reason.value, now=now):
        await pause(conn, pending.practice_id, ERROR_CODES[reason], config, now=now)
    return HandlerResult(handled=True, reason=reason.value, ledger_id=pending.id)


# -- card setup ----------------------------------------------------------------------


async def apply_setup(
    conn: Connection,
    practice_id: str,
    *,
    customer_id: str | None,
    payment_method_id: str | None,
    config: CreditConfigLike,
    now: int,
) -> HandlerResult:
    """Save a completed card setup and enable auto top-up; an incomplete one changes nothing set.

    With customer AND payment method, both are saved and auto top-up is on
    (the practice's amounts, or the defaults for a new one). With only one of
    them, it fills in what was empty and the answer says
    AUTO_TOPUP_SETUP_INCOMPLETE; a complete earlier setup is not mixed with it.
    """
    settings = await load_settings(conn, practice_id, config)
    if customer_id and payment_method_id:
        settings = replace(
            settings,
            stripe_customer_id=customer_id,
            default_payment_method_id=payment_method_id,
            auto_topup_enabled=True,
            paused_reason=None,
        )
        await save_settings(conn, settings, now=now)
        return HandlerResult(handled=True, auto_topup_enabled=True)
    settings = replace(
        settings,
        stripe_customer_id=settings.stripe_customer_id or customer_id,
        default_payment_method_id=settings.default_payment_method_id or payment_method_id,
    )
    await save_settings(conn, settings, now=now)
    return HandlerResult(
        handled=True, reason=SETUP_INCOMPLETE, auto_topup_enabled=settings.auto_topup_enabled
    )


def setup_session_ids(
    session: Mapping[str, Any], retrieved: SetupIntentResult | None = None
) -> tuple[str | None, str | None]:
    """Customer and payment method ids of a setup Checkout Session.

    The SetupIntent may be embedded (dict, object, JSON string) or a bare id,
    in which case `retrieved` is that SetupIntent fetched from Stripe.
    """
    customer = normalize_stripe_id(session.get("customer"), "cus_")
    intent = session.get("setup_intent")
    payment_method = normalize_stripe_id(_get(intent, "payment_method"), "pm_")
    if retrieved is not None:
        payment_method = payment_method or retrieved.payment_method_id
        customer = customer or retrieved.customer_id
    if customer is None:
        customer = normalize_stripe_id(_get(intent, "customer"), "cus_")
    return customer, payment_method


async def process_setup_checkout_completed(
    conn: Connection,
    session: Mapping[str, Any],
    *,
    config: CreditConfigLike,
    now: int,
    retrieved: SetupIntentResult | None = None,
) -> HandlerResult:
    practice_id = _metadata(session).get("practice_id")
    if not practice_id:
        return HandlerResult(handled=False, reason="invalid_metadata")
    customer, payment_method = setup_session_ids(session, retrieved)
    return await apply_setup(
        conn,
        practice_id,
        customer_id=customer,
        payment_method_id=payment_method,
        config=config,
        now=now,
    )


async def process_setup_intent_succeeded(
    conn: Connection, setup_intent: Mapping[str, Any], *, config: CreditConfigLike, now: int
) -> HandlerResult:
    practice_id = _metadata(setup_intent).get("practice_id")
    if not practice_id:
        return HandlerResult(handled=False, reason="invalid_metadata")
    return await apply_setup(
        conn,
        practice_id,
        customer_id=normalize_stripe_id(setup_intent.get("customer"), "cus_"),
        payment_method_id=normalize_stripe_id(setup_intent.get("payment_method"), "pm_"),
        config=config,
        now=now,
    )


# -- refunds -------------------------------------------------------------------------


async def refunded_purchase(conn: Connection, charge: Mapping[str, Any]) -> LedgerEntry | None:
    """The succeeded purchase a refunded charge paid for."""
    pi_id = normalize_stripe_id(charge.get("payment_intent"), "pi_")
    if pi_id is None:
        return None
    entry = await find_purchase(conn, payment_intent_id=pi_id)
    return entry if entry is not None and entry.status == Status.SUCCEEDED else None


async def process_charge_refunded(
    conn: Connection, charge: Mapping[str, Any], *, now: int, event_id: str | None = None
) -> HandlerResult:
    """A refund entry for the part of the charge newly refunded, at the original entry's rate.

    Stripe reports the cumulative `amount_refunded`; what earlier refund
    entries took is subtracted, so a replay or a later partial refund books
    only the difference.
    """
    original = await refunded_purchase(conn, charge)
    charge_id = normalize_stripe_id(charge.get("id"), "ch_") or normalize_stripe_id(
        charge.get("id"), "py_"
    )
    refunded_total = _int_or_none(charge.get("amount_refunded"))
    if original is None or charge_id is None or refunded_total is None:
        return HandlerResult(handled=False, reason="unknown_charge")
    row = await conn.fetchone(
        "SELECT COALESCE(SUM(amount_paid_rappen), 0) AS rappen, "
        "COALESCE(SUM(amount_internal_micro_usd), 0) AS micros FROM ai_credit_ledger "
        "WHERE event_type = ? AND stripe_payment_intent_id = ?",
        EventType.REFUND.value,
        original.payment_intent_id,
    )
    assert row is not None
    already_rappen, already_micros = -int(row["rappen"]), -int(row["micros"])
    paid = original.paid_rappen or 0
    refunded_total = min(refunded_total, paid)
    newly_rappen = refunded_total - already_rappen
    if newly_rappen <= 0:
        return HandlerResult(handled=True, duplicate=True, ledger_id=original.id)
    newly_micros = (
        refund_share_micros(original.amount_micros, paid, refunded_total) - already_micros
    )
    refunds = _get(charge, "refunds")
    refund_ids = [
        rid
        for rid in (normalize_stripe_id(r, "re_") for r in (_get(refunds, "data") or []))
        if rid is not None
    ]
    ledger_id = await insert_entry(
        conn,
        NewEntry(
            practice_id=original.practice_id,
            event_type=EventType.REFUND,
            status=Status.SUCCEEDED,
            amount_micros=-newly_micros,
            paid_rappen=-newly_rappen,
            subscription_id=original.subscription_id,
            payment_intent_id=original.payment_intent_id,
            charge_id=charge_id,
            event_id=event_id,
            idempotency_key=f"refund:{charge_id}:{refunded_total}",
            meta={
                "original_ledger_id": original.id,
                "refunded_total_rappen": refunded_total,
                "stripe_refunds": refund_ids,
            },
        ),
        now=now,
    )
    return HandlerResult(handled=True, ledger_id=ledger_id)


# -- subscriptions -------------------------------------------------------------------


def _subscription_fields(sub: Mapping[str, Any]) -> tuple[str | None, int | None, int | None]:
    """Plan lookup_key and period of a subscription (period on the item in newer API versions)."""
    items = _get(_get(sub, "items"), "data") or []
    first = items[0] if items else None
    lookup_key = _get(_get(first, "price"), "lookup_key")
    start = _int_or_none(sub.get("current_period_start")) or _int_or_none(
        _get(first, "current_period_start")
    )
    end = _int_or_none(sub.get("current_period_end")) or _int_or_none(
        _get(first, "current_period_end")
    )
    return (str(lookup_key) if lookup_key else None), start, end


STALE_EVENT = "stale_event"


async def process_subscription_event(
    conn: Connection,
    sub: Mapping[str, Any],
    *,
    deleted: bool,
    now: int,
    event_created: int | None = None,
) -> HandlerResult:
    """Keep `licenses` in sync with a Stripe subscription (status, plan, period).

    Stripe does not deliver events in order and retries old deliveries, so
    the row keeps the `created` time of the event it last applied
    (`stripe_event_created`) and an older event changes nothing: it is
    handled, with reason `stale_event` (the ordering rule is
    `credit.licenses`', in its one upsert).
    """
    sub_id = normalize_stripe_id(sub.get("id"), "sub_")
    if sub_id is None:
        return HandlerResult(handled=False, reason="invalid_subscription")
    existing = await practice_of_subscription(conn, sub_id)
    practice_id = _metadata(sub).get("practice_id") or existing
    if not practice_id:
        log.warning("subscription event for an unknown practice ignored")
        return HandlerResult(handled=False, reason="unknown_practice")
    status = str(sub.get("status") or "")
    if deleted and status not in FINAL_SUBSCRIPTION_STATUSES:
        status = "canceled"
    lookup_key, start, end = _subscription_fields(sub)
    changed = await write_license(
        conn,
        LicenseWrite(
            subscription_id=sub_id,
            practice_id=str(practice_id),
            customer_id=normalize_stripe_id(sub.get("customer"), "cus_"),
            status=status,
            lookup_key=lookup_key,
            period_start=start,
            period_end=end,
            stripe_event_created=event_created,
        ),
        now=now,
    )
    if not changed:
        log.info("out-of-order subscription event ignored (the license holds a newer state)")
        return HandlerResult(handled=True, reason=STALE_EVENT)
    return HandlerResult(handled=True)


# -- the endpoint's entry point ------------------------------------------------------------

_SUBSCRIPTION_EVENTS = (
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
)


class WebhookHandler:
    """Verifies a delivery and runs its handler in one transaction with its event id."""

    def __init__(
        self,
        db: Database,
        *,
        stripe: StripePort | None,
        config: CreditConfigLike,
        webhook_secret: str | None,
        clock: Callable[[], float],
    ) -> None:
        self._db = db
        self._stripe = stripe
        self._config = config
        self._secret = webhook_secret
        self._clock = clock

    def __repr__(self) -> str:
        return "WebhookHandler()"

    def _verify(self, payload: bytes, signature: str | None) -> dict[str, Any]:
        if not self._secret:
            raise CreditError(
                503,
                "STRIPE_WEBHOOK_NOT_CONFIGURED",
                "STRIPE_WEBHOOK_SECRET is not set; webhooks cannot be verified",
                message_user="Stripe-Webhooks sind nicht eingerichtet.",
            )
        if not signature:
            raise WebhookSignatureError("missing Stripe-Signature header")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise WebhookSignatureError("webhook body is not UTF-8") from None
        try:
            stripe_lib.WebhookSignature.verify_header(
                text, signature, self._secret, tolerance=SIGNATURE_TOLERANCE_SECONDS
            )
        except stripe_lib.SignatureVerificationError:
            raise WebhookSignatureError("Stripe signature does not match the body") from None
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if (
            not isinstance(event, dict)
            or not isinstance(event.get("id"), str)
            or not isinstance(event.get("type"), str)
            or not isinstance(_get(event.get("data"), "object"), Mapping)
        ):
            raise CreditError(400, "INVALID_WEBHOOK_PAYLOAD", "webhook body is not a Stripe event")
        return event

    async def _prefetch(self, event_type: str, obj: Mapping[str, Any]) -> SetupIntentResult | None:
        """Stripe calls a handler needs, made before its transaction opens."""
        if event_type != "checkout.session.completed":
            return None
        if _metadata(obj).get("aza_purpose") != PURPOSE_SETUP:
            return None
        intent = obj.get("setup_intent")
        if not isinstance(intent, str) or not intent.startswith("seti_") or self._stripe is None:
            return None
        try:
            # StripeUnavailable propagates: nothing is written, Stripe retries.
            return await self._stripe.retrieve_setup_intent(intent)
        except StripeRequestFailed:
            return None

    async def _lock_key(self, event_type: str, obj: Mapping[str, Any], event_id: str) -> str:
        """The practice a delivery concerns (its transactions serialise on it)."""
        practice = _metadata(obj).get("practice_id")
        if practice:
            return practice
        async with self._db.read() as conn:
            if event_type == "charge.refunded":
                entry = await refunded_purchase(conn, obj)
                if entry is not None:
                    return entry.practice_id
            elif event_type in _SUBSCRIPTION_EVENTS:
                sub_id = normalize_stripe_id(obj.get("id"), "sub_")
                value = None if sub_id is None else await practice_of_subscription(conn, sub_id)
                if value:
                    return value
        return f"stripe-event:{event_id}"

    async def handle(self, payload: bytes, signature: str | None) -> dict[str, Any]:
        event = self._verify(payload, signature)
        event_id: str = event["id"]
        event_type: str = event["type"]
        obj: Mapping[str, Any] = event["data"]["object"]
        # When Stripe created the event: orders subscription events delivered out of order.
        event_created = _int_or_none(event.get("created"))
        retrieved = await self._prefetch(event_type, obj)
        lock = await self._lock_key(event_type, obj, event_id)
        answer: dict[str, Any] = {"received": True, "event_type": event_type, "event_id": event_id}
        for attempt in range(2):
            try:
                async with self._db.transaction(lock=lock) as conn:
                    seen = await conn.fetchval(
                        "SELECT 1 FROM stripe_webhook_events WHERE event_id = ?", event_id
                    )
                    if seen:
                        return {**answer, "duplicate": True, "handled": False}
                    now = int(self._clock())
                    await conn.execute(
                        "INSERT INTO stripe_webhook_events (event_id, event_type, received_at) "
                        "VALUES (?, ?, ?)",
                        event_id,
                        event_type,
                        now,
                    )
                    result = await self._dispatch(
                        conn, event_type, obj, event_id, event_created, retrieved, now
                    )
            except UniqueViolation:
                # A concurrent delivery under another lock key committed first;
                # the second attempt sees its work and reports a duplicate.
                if attempt:
                    raise
                continue
            return {
                **answer,
                "duplicate": False,
                "handled": result.handled,
                "credited": result.credited,
                "result": result.to_dict(),
            }
        raise AssertionError("unreachable")  # pragma: no cover

    async def _dispatch(
        self,
        conn: Connection,
        event_type: str,
        obj: Mapping[str, Any],
        event_id: str,
        event_created: int | None,
        retrieved: SetupIntentResult | None,
        now: int,
    ) -> HandlerResult:
        purpose = _metadata(obj).get("aza_purpose")
        currency = self._config.currency
        if event_type in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
            if purpose == PURPOSE_TOPUP:
                return await process_topup_checkout_completed(
                    conn, obj, now=now, event_id=event_id, currency=currency
                )
            if purpose == PURPOSE_SETUP and event_type == "checkout.session.completed":
                return await process_setup_checkout_completed(
                    conn, obj, config=self._config, now=now, retrieved=retrieved
                )
            return IGNORED
        if event_type == "checkout.session.async_payment_failed":
            meta = parse_topup_meta(_metadata(obj))
            if purpose != PURPOSE_TOPUP or meta is None:
                return IGNORED
            return await _record_failed_purchase(
                conn,
                meta,
                reason="async_payment_failed",
                checkout_session_id=normalize_stripe_id(obj.get("id"), "cs_"),
                payment_intent_id=normalize_stripe_id(obj.get("payment_intent"), "pi_"),
                event_id=event_id,
                now=now,
            )
        if event_type == "payment_intent.succeeded":
            if purpose == PURPOSE_TOPUP:
                return await process_topup_payment_intent_succeeded(
                    conn, obj, now=now, event_id=event_id, currency=currency
                )
            if purpose == PURPOSE_AUTO_TOPUP:
                return await process_auto_topup_payment_intent_succeeded(
                    conn, obj, now=now, event_id=event_id, currency=currency
                )
            return IGNORED
        if event_type == "payment_intent.payment_failed":
            if purpose == PURPOSE_AUTO_TOPUP:
                return await process_auto_topup_payment_failed(
                    conn, obj, now=now, config=self._config
                )
            meta = parse_topup_meta(_metadata(obj))
            if purpose == PURPOSE_TOPUP and meta is not None:
                return await _record_failed_purchase(
                    conn,
                    meta,
                    reason="payment_failed",
                    checkout_session_id=None,
                    payment_intent_id=normalize_stripe_id(obj.get("id"), "pi_"),
                    event_id=event_id,
                    now=now,
                )
            return IGNORED
        if event_type == "setup_intent.succeeded":
            if purpose == PURPOSE_SETUP:
                return await process_setup_intent_succeeded(conn, obj, config=self._config, now=now)
            return IGNORED
        if event_type == "charge.refunded":
            return await process_charge_refunded(conn, obj, now=now, event_id=event_id)
        if event_type in _SUBSCRIPTION_EVENTS:
            return await process_subscription_event(
                conn,
                obj,
                deleted=event_type.endswith(".deleted"),
                now=now,
                event_created=event_created,
            )
        return IGNORED
