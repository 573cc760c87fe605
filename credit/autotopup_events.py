"""Automatic top-ups: the webhooks of the PaymentIntents `credit.autotopup` creates.

An automatic top-up is booked as a pending ledger entry before its
PaymentIntent is created; `payment_intent.succeeded` settles that entry
(or credits the payment once if there is none), `payment_intent.payment_failed`
fails it and pauses automatic top-ups with the reason the owner must act on.
"""

from __future__ import annotations

from credit.autotopup import pause
from credit.checkout import PURPOSE_AUTO_TOPUP
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
)
from credit.policy import ERROR_CODES, Reason
from credit.ports import Connection
from credit.purchases import credit_purchase, paid_mismatch
from credit.stripe_events import PaymentIntent
from credit.webhook_handling import Delivery, HandlerResult


async def _pending_for(
    conn: Connection, intent: PaymentIntent, practice_id: str
) -> LedgerEntry | None:
    """The pending automatic top-up this PaymentIntent pays (by our ledger id, or its id)."""
    if intent.ledger_id is not None:
        entry = await get_entry(conn, intent.ledger_id)
        if entry is not None and entry.practice_id == practice_id:
            return entry
    if intent.id is None:
        return None
    value = await conn.fetchval(
        "SELECT id FROM ai_credit_ledger WHERE stripe_payment_intent_id = ? AND status = 'pending'",
        intent.id,
    )
    return None if value is None else await get_entry(conn, int(value))


async def payment_intent_succeeded(conn: Connection, delivery: Delivery) -> HandlerResult:
    """Credit an automatic top-up's PaymentIntent once (settling its pending entry if any)."""
    intent = delivery.event.object
    assert isinstance(intent, PaymentIntent)
    meta = delivery.event.topup
    pi_id, now, event_id = intent.id, delivery.now, delivery.event.id
    if meta is None or pi_id is None:
        return HandlerResult(handled=False, reason="invalid_metadata")
    existing = await find_purchase(conn, payment_intent_id=pi_id)
    # Unlike a manual top-up's, a pending entry is no duplicate: this event settles it.
    if existing is not None and existing.status == Status.SUCCEEDED:
        return HandlerResult(handled=True, duplicate=True, ledger_id=existing.id)
    pending = await _pending_for(conn, intent, meta.practice_id)
    received = intent.amount_received
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
    mismatch = paid_mismatch(meta, received, intent.currency, delivery.config.currency)
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
    return await credit_purchase(
        conn,
        meta,
        event_type=EventType.AUTO_TOPUP_PURCHASE,
        checkout_session_id=None,
        payment_intent_id=pi_id,
        event_id=event_id,
        now=now,
    )


async def payment_failed(conn: Connection, delivery: Delivery) -> HandlerResult:
    """Fail the pending automatic top-up this PaymentIntent was for, and pause auto top-up."""
    intent = delivery.event.object
    assert isinstance(intent, PaymentIntent)
    practice_id = delivery.event.metadata.get("practice_id") or ""
    pending = await _pending_for(conn, intent, practice_id)
    if pending is None or pending.status != Status.PENDING:
        return HandlerResult(handled=True, reason="no_pending_entry")
    reason = (
        Reason.REQUIRES_ACTION
        if intent.error_code == "authentication_required" or intent.status == "requires_action"
        else Reason.PAYMENT_FAILED
    )
    now = delivery.now
    failed = await fail_pending(
        conn, pending.id, payment_intent_id=intent.id, reason=reason.value, now=now
    )
    if failed:
        await pause(conn, pending.practice_id, ERROR_CODES[reason], delivery.config, now=now)
    return HandlerResult(handled=True, reason=reason.value, ledger_id=pending.id)
