"""Booking a top-up purchase once: credited, or recorded as failed, keyed by its Stripe objects.

Each credit happens once, keyed by its Stripe object: a checkout session's
credit also carries its PaymentIntent id, so `checkout.session.completed`
and `payment_intent.succeeded` for one payment credit once in either order
(checked under the practice's lock, backed by the schema's unique indexes).
Manual (`credit.topups`) and automatic (`credit.autotopup_events`) top-ups
book through here.
"""

from __future__ import annotations

import logging

from credit.checkout import PURPOSE_AUTO_TOPUP, PURPOSE_TOPUP
from credit.ledger import (
    EventType,
    LedgerEntry,
    NewEntry,
    Status,
    find_purchase,
    insert_entry,
    stripe_object_filter,
)
from credit.ports import Connection
from credit.stripe_events import TopupMeta
from credit.webhook_handling import HandlerResult

log = logging.getLogger("credit.webhooks")


def paid_mismatch(
    meta: TopupMeta, paid_rappen: int | None, currency: str | None, want_currency: str
) -> str | None:
    """Why Stripe's amount does not match the metadata, or None when it does (or is absent)."""
    if paid_rappen is not None and paid_rappen != meta.paid_rappen:
        return "amount_mismatch"
    if currency is not None and currency.lower() != want_currency.lower():
        return "currency_mismatch"
    return None


async def record_failed_purchase(
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


async def credit_purchase(
    conn: Connection,
    meta: TopupMeta,
    *,
    event_type: EventType,
    checkout_session_id: str | None,
    payment_intent_id: str | None,
    event_id: str | None,
    now: int,
) -> HandlerResult:
    """Credit a paid purchase, unless one of its Stripe objects was credited already.

    A manual top-up's entry is keyed by its reference (`meta.purchase_key`),
    which its session and its PaymentIntent both carry: the second of their
    events finds the entry even when the first named only one of the ids.
    """
    key = meta.purchase_key if event_type is EventType.TOPUP_PURCHASE else None
    existing = await find_purchase(
        conn,
        checkout_session_id=checkout_session_id,
        payment_intent_id=payment_intent_id,
        idempotency_key=key,
    )
    if existing is not None:
        await complete_references(conn, existing, checkout_session_id, payment_intent_id, now)
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
            idempotency_key=key,
            meta={
                "aza_purpose": PURPOSE_TOPUP
                if event_type is EventType.TOPUP_PURCHASE
                else PURPOSE_AUTO_TOPUP
            },
        ),
        now=now,
    )
    return HandlerResult(handled=True, credited=True, ledger_id=ledger_id)


async def complete_references(
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
