"""Manual top-ups: the webhooks of a top-up Checkout Session and its PaymentIntent.

A paid session (or its PaymentIntent, whichever comes first) credits the
purchase once (`credit.purchases`); an unpaid one, an amount or currency
that does not match the metadata, or a failed payment is recorded as a
failed purchase with its reason.
"""

from __future__ import annotations

import logging

from credit.ledger import EventType, find_purchase
from credit.ports import Connection
from credit.purchases import (
    complete_references,
    credit_purchase,
    paid_mismatch,
    record_failed_purchase,
)
from credit.stripe_events import CheckoutSession, PaymentIntent, TopupMeta
from credit.webhook_handling import IGNORED, Delivery, HandlerResult

log = logging.getLogger("credit.webhooks")


async def checkout_completed(conn: Connection, delivery: Delivery) -> HandlerResult:
    """Credit a paid top-up Checkout Session once; an unpaid one is recorded as failed."""
    session = delivery.event.object
    assert isinstance(session, CheckoutSession)
    meta = delivery.event.topup
    if meta is None or session.id is None:
        log.warning("top-up checkout session without valid metadata ignored")
        return HandlerResult(handled=False, reason="invalid_metadata")
    now = delivery.now
    cs_id, pi_id = session.id, session.payment_intent_id
    existing = await find_purchase(
        conn, checkout_session_id=cs_id, payment_intent_id=pi_id, idempotency_key=meta.purchase_key
    )
    if existing is not None:
        await complete_references(conn, existing, cs_id, pi_id, now)
        return HandlerResult(handled=True, duplicate=True, ledger_id=existing.id)
    status = session.payment_status
    mismatch = paid_mismatch(meta, session.amount_total, session.currency, delivery.config.currency)
    unpaid = None if status in ("paid", "no_payment_required") else status or "unknown"
    failure = mismatch or (f"payment_status_{unpaid}" if unpaid else None)
    return await _book(
        conn,
        meta,
        failure=failure,
        checkout_session_id=cs_id,
        payment_intent_id=pi_id,
        event_id=delivery.event.id,
        now=now,
    )


async def checkout_failed(conn: Connection, delivery: Delivery) -> HandlerResult:
    """`checkout.session.async_payment_failed`: the top-up recorded as failed."""
    session = delivery.event.object
    assert isinstance(session, CheckoutSession)
    meta = delivery.event.topup
    if meta is None:
        return IGNORED
    return await record_failed_purchase(
        conn,
        meta,
        reason="async_payment_failed",
        checkout_session_id=session.id,
        payment_intent_id=session.payment_intent_id,
        event_id=delivery.event.id,
        now=delivery.now,
    )


async def payment_intent_succeeded(conn: Connection, delivery: Delivery) -> HandlerResult:
    """Credit a manual top-up's PaymentIntent once (deduplicated with its checkout session)."""
    intent = delivery.event.object
    assert isinstance(intent, PaymentIntent)
    meta = delivery.event.topup
    if meta is None or intent.id is None:
        return HandlerResult(handled=False, reason="invalid_metadata")
    # By its id, or by the top-up's reference when its session was booked
    # first without naming it; then the entry learns its id, so a later
    # refund (which names only the PaymentIntent) finds it.
    existing = await find_purchase(
        conn, payment_intent_id=intent.id, idempotency_key=meta.purchase_key
    )
    if existing is not None:
        await complete_references(conn, existing, None, intent.id, delivery.now)
        return HandlerResult(handled=True, duplicate=True, ledger_id=existing.id)
    mismatch = paid_mismatch(
        meta, intent.amount_received, intent.currency, delivery.config.currency
    )
    return await _book(
        conn,
        meta,
        failure=mismatch,
        checkout_session_id=None,
        payment_intent_id=intent.id,
        event_id=delivery.event.id,
        now=delivery.now,
    )


async def payment_intent_failed(conn: Connection, delivery: Delivery) -> HandlerResult:
    """`payment_intent.payment_failed` of a manual top-up: recorded as failed."""
    intent = delivery.event.object
    assert isinstance(intent, PaymentIntent)
    meta = delivery.event.topup
    if meta is None:
        return IGNORED
    return await record_failed_purchase(
        conn,
        meta,
        reason="payment_failed",
        checkout_session_id=None,
        payment_intent_id=intent.id,
        event_id=delivery.event.id,
        now=delivery.now,
    )


async def _book(
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
        return await record_failed_purchase(
            conn,
            meta,
            reason=failure,
            checkout_session_id=checkout_session_id,
            payment_intent_id=payment_intent_id,
            event_id=event_id,
            now=now,
        )
    return await credit_purchase(
        conn,
        meta,
        event_type=EventType.TOPUP_PURCHASE,
        checkout_session_id=checkout_session_id,
        payment_intent_id=payment_intent_id,
        event_id=event_id,
        now=now,
    )
