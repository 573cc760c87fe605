"""Refunds: `charge.refunded` books what was newly refunded, at the purchase's own rate."""

from __future__ import annotations

from dataclasses import replace

from credit.errors import CreditError, Refusal
from credit.ledger import EventType, LedgerEntry, NewEntry, Status, find_purchase, insert_entry
from credit.money import refund_share_micros
from credit.ports import Connection
from credit.purchases import complete_references
from credit.stripe_events import Charge
from credit.webhook_handling import Delivery, HandlerResult


async def refunded_purchase(
    conn: Connection, charge: Charge, purchase_key: str | None = None
) -> LedgerEntry | None:
    """The succeeded purchase a refunded charge paid for.

    By the charge's PaymentIntent; else by the top-up reference its
    PaymentIntent carries (`purchase_key`, retrieved from Stripe), for a
    purchase its Checkout Session booked without naming the PaymentIntent.
    """
    if charge.payment_intent_id is None:
        return None
    entry = await find_purchase(conn, payment_intent_id=charge.payment_intent_id)
    if entry is None and purchase_key is not None:
        entry = await find_purchase(conn, idempotency_key=purchase_key)
    return entry if entry is not None and entry.status == Status.SUCCEEDED else None


async def charge_refunded(conn: Connection, delivery: Delivery) -> HandlerResult:
    """A refund entry for the part of the charge newly refunded, at the original entry's rate.

    Stripe reports the cumulative `amount_refunded`; what earlier refund
    entries took is subtracted, so a replay or a later partial refund books
    only the difference.
    """
    charge = delivery.event.object
    assert isinstance(charge, Charge)
    original = await refunded_purchase(conn, charge, delivery.refund_purchase_key)
    charge_id, refunded_total = charge.id, charge.amount_refunded
    if original is None and delivery.refund_purchase_key is not None:
        # The PaymentIntent names one of our top-ups, whose own event has not
        # been booked yet (Stripe does not order deliveries). Refused, so the
        # transaction writes nothing and Stripe delivers the refund again
        # after the purchase.
        raise CreditError(
            Refusal.CONFLICT,
            "REFUND_BEFORE_PURCHASE",
            "the refunded top-up is not booked yet; Stripe retries this event",
            message_user="Die Rückerstattung wird verbucht, sobald die Zahlung verbucht ist.",
        )
    if original is None or charge_id is None or refunded_total is None:
        return HandlerResult(handled=False, reason="unknown_charge")
    if original.payment_intent_id is None and charge.payment_intent_id is not None:
        # Found by its reference: the purchase learns its PaymentIntent, which
        # the refund entries below are grouped by.
        await complete_references(conn, original, None, charge.payment_intent_id, delivery.now)
        original = replace(original, payment_intent_id=charge.payment_intent_id)
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
            event_id=delivery.event.id,
            idempotency_key=f"refund:{charge_id}:{refunded_total}",
            meta={
                "original_ledger_id": original.id,
                "refunded_total_rappen": refunded_total,
                "stripe_refunds": list(charge.refund_ids),
            },
        ),
        now=delivery.now,
    )
    return HandlerResult(handled=True, ledger_id=ledger_id)
