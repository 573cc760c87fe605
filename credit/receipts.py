"""Receipts: the URL of a paid top-up's invoice or receipt, kept in its ledger entry.

Stripe makes the documents a Swiss practice books: a Checkout top-up creates
an invoice (`invoice_creation`, VAT itemised by the tax rate or Stripe Tax),
an automatic top-up's charge e-mails a receipt to the license's address
(`receipt_email`). Once the payment is credited, the URL Stripe hosts is
looked up and written to the entry (`receipt_url`, migration 011), so the
history can link it. Best effort, after the credit has committed: a lookup
that fails leaves the URL empty and never undoes or delays a credit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from credit.ledger import set_receipt_url
from credit.ports import Database
from credit.stripe_port import StripePort

log = logging.getLogger("aza.credit.receipts")


async def keep_receipt(
    db: Database,
    stripe: StripePort | None,
    *,
    practice_id: str,
    checkout_session_id: str | None = None,
    payment_intent_id: str | None = None,
    invoice_id: str | None = None,
    charge_id: str | None = None,
    ledger_id: int | None = None,
    clock: Callable[[], float] = time.time,
) -> str | None:
    """Look the receipt URL up at Stripe and keep it in the paid entry; the URL or None."""
    if stripe is None or not (invoice_id or payment_intent_id or charge_id):
        return None
    try:
        url = await stripe.receipt_url(
            invoice_id=invoice_id, payment_intent_id=payment_intent_id, charge_id=charge_id
        )
    except Exception as exc:  # best effort: the credit stands without its receipt link
        log.warning("receipt of %s not found at Stripe: %s", practice_id, exc.__class__.__name__)
        return None
    if not url:
        return None
    try:
        async with db.transaction(lock=practice_id) as conn:
            if ledger_id is None:
                ledger_id = await conn.fetchval(
                    "SELECT id FROM ai_credit_ledger WHERE practice_id = ? "
                    "AND status = 'succeeded' "
                    "AND event_type IN ('topup_purchase', 'auto_topup_purchase') "
                    "AND (stripe_checkout_session_id = ? OR stripe_payment_intent_id = ?) "
                    "ORDER BY id LIMIT 1",
                    practice_id,
                    checkout_session_id or "",
                    payment_intent_id or "",
                )
            if ledger_id is None:
                return None
            await set_receipt_url(conn, int(ledger_id), url, now=int(clock()))
    except Exception as exc:  # the credit is committed already; only its link is lost
        log.warning("receipt of %s not kept: %s", practice_id, exc.__class__.__name__)
        return None
    return url
