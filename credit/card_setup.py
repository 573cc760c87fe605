"""Card setup: a completed setup saves the customer and card, and turns automatic top-ups on.

Stripe reports a setup either as a setup Checkout Session (its SetupIntent
embedded, or only named by id and fetched before the transaction) or as
`setup_intent.succeeded`; both end in `apply_setup`.
"""

from __future__ import annotations

from dataclasses import replace

from credit.config import CreditConfig
from credit.ports import Connection
from credit.stripe_events import CheckoutSession, SetupIntent
from credit.stripe_port import SetupIntentResult
from credit.topup_settings import load_settings, save_settings
from credit.webhook_handling import Delivery, HandlerResult

SETUP_INCOMPLETE = "AUTO_TOPUP_SETUP_INCOMPLETE"


async def apply_setup(
    conn: Connection,
    practice_id: str,
    *,
    customer_id: str | None,
    payment_method_id: str | None,
    config: CreditConfig,
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
    session: CheckoutSession, retrieved: SetupIntentResult | None = None
) -> tuple[str | None, str | None]:
    """Customer and payment method ids of a setup Checkout Session.

    The SetupIntent may be embedded or a bare id, in which case `retrieved`
    is that SetupIntent fetched from Stripe.
    """
    customer = session.customer_id
    payment_method = session.setup_payment_method_id
    if retrieved is not None:
        payment_method = payment_method or retrieved.payment_method_id
        customer = customer or retrieved.customer_id
    if customer is None:
        customer = session.setup_customer_id
    return customer, payment_method


async def checkout_completed(conn: Connection, delivery: Delivery) -> HandlerResult:
    """A setup Checkout Session completed."""
    session = delivery.event.object
    assert isinstance(session, CheckoutSession)
    practice_id = delivery.event.metadata.get("practice_id")
    if not practice_id:
        return HandlerResult(handled=False, reason="invalid_metadata")
    customer, payment_method = setup_session_ids(session, delivery.retrieved)
    return await apply_setup(
        conn,
        practice_id,
        customer_id=customer,
        payment_method_id=payment_method,
        config=delivery.config,
        now=delivery.now,
    )


async def setup_intent_succeeded(conn: Connection, delivery: Delivery) -> HandlerResult:
    """`setup_intent.succeeded` of our setup."""
    intent = delivery.event.object
    assert isinstance(intent, SetupIntent)
    practice_id = delivery.event.metadata.get("practice_id")
    if not practice_id:
        return HandlerResult(handled=False, reason="invalid_metadata")
    return await apply_setup(
        conn,
        practice_id,
        customer_id=intent.customer_id,
        payment_method_id=intent.payment_method_id,
        config=delivery.config,
        now=delivery.now,
    )
