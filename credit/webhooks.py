"""Stripe webhooks: verified, parsed once, routed by a table, processed once.

- The signature is checked against the raw body (Stripe's scheme, 5 minute
  tolerance, `credit.stripe_port.signature_matches`) before anything is
  parsed or written.
- The event is parsed once into typed values (`credit.stripe_events`) and
  routed by `ROUTES` (event type and our `aza_purpose`) to its handler:
  manual top-ups (`credit.topups`), automatic ones (`credit.autotopup_events`),
  card setup (`credit.card_setup`), refunds (`credit.refunds`) and
  subscriptions (`credit.subscriptions`). Each credit happens once
  (`credit.purchases`).
- Each event is processed once: its id goes into `stripe_webhook_events` in
  the same transaction as its effects. When a handler fails, the transaction
  rolls back, the id is not recorded, and Stripe's retry finds a clean state.
- Stripe API calls a handler needs (retrieving a SetupIntent) happen before
  the transaction opens, never inside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from credit import autotopup_events, card_setup, refunds, subscriptions, topups
from credit.checkout import PURPOSE_AUTO_TOPUP, PURPOSE_SETUP, PURPOSE_TOPUP
from credit.config import CreditConfig
from credit.errors import CreditError, Refusal, WebhookSignatureError
from credit.licenses import practice_of_subscription
from credit.ports import Database, UniqueViolation
from credit.receipts import keep_receipt
from credit.stripe_events import (
    Charge,
    CheckoutSession,
    PaymentIntent,
    StripeEvent,
    Subscription,
    get,
    parse_event,
    purchase_key,
)
from credit.stripe_port import (
    SetupIntentResult,
    StripePort,
    StripeRequestFailed,
    signature_matches,
)
from credit.webhook_handling import IGNORED, Delivery, Handler

SIGNATURE_TOLERANCE_SECONDS = 300

_SUBSCRIPTION_EVENTS = (
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
)

# Event type and purpose → handler; `None` as purpose: whatever the purpose.
# An event that matches no row is recorded and answered `ignored`.
ROUTES: Mapping[tuple[str, str | None], Handler] = {
    ("checkout.session.completed", PURPOSE_TOPUP): topups.checkout_completed,
    ("checkout.session.async_payment_succeeded", PURPOSE_TOPUP): topups.checkout_completed,
    ("checkout.session.async_payment_failed", PURPOSE_TOPUP): topups.checkout_failed,
    ("payment_intent.succeeded", PURPOSE_TOPUP): topups.payment_intent_succeeded,
    ("payment_intent.payment_failed", PURPOSE_TOPUP): topups.payment_intent_failed,
    ("payment_intent.succeeded", PURPOSE_AUTO_TOPUP): autotopup_events.payment_intent_succeeded,
    ("payment_intent.payment_failed", PURPOSE_AUTO_TOPUP): autotopup_events.payment_failed,
    ("checkout.session.completed", PURPOSE_SETUP): card_setup.checkout_completed,
    ("setup_intent.succeeded", PURPOSE_SETUP): card_setup.setup_intent_succeeded,
    ("charge.refunded", None): refunds.charge_refunded,
    **{(event_type, None): subscriptions.subscription_event for event_type in _SUBSCRIPTION_EVENTS},
}


def route(event: StripeEvent) -> Handler | None:
    """The handler of an event: for its purpose, else for any purpose; None if none."""
    return ROUTES.get((event.type, event.purpose)) or ROUTES.get((event.type, None))


class WebhookHandler:
    """Verifies a delivery and runs its handler in one transaction with its event id."""

    def __init__(
        self,
        db: Database,
        *,
        stripe: StripePort | None,
        config: CreditConfig,
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

    def _verify(self, payload: bytes, signature: str | None) -> StripeEvent:
        if not self._secret:
            raise CreditError(
                Refusal.NOT_CONFIGURED,
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
        if not signature_matches(
            text, signature, self._secret, tolerance_seconds=SIGNATURE_TOLERANCE_SECONDS
        ):
            raise WebhookSignatureError("Stripe signature does not match the body")
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
            event = None
        obj = get(event.get("data"), "object") if isinstance(event, dict) else None
        if (
            not isinstance(event, dict)
            or not isinstance(event.get("id"), str)
            or not isinstance(event.get("type"), str)
            or not isinstance(obj, Mapping)
        ):
            raise CreditError(
                Refusal.BAD_REQUEST, "INVALID_WEBHOOK_PAYLOAD", "webhook body is not a Stripe event"
            )
        return parse_event(event["id"], event["type"], event.get("created"), obj)

    async def _prefetch(self, event: StripeEvent) -> SetupIntentResult | None:
        """Stripe calls a handler needs, made before its transaction opens."""
        if event.type != "checkout.session.completed" or event.purpose != PURPOSE_SETUP:
            return None
        intent_id = getattr(event.object, "setup_intent_id", None)
        if intent_id is None or self._stripe is None:
            return None
        try:
            # StripeUnavailable propagates: nothing is written, Stripe retries.
            return await self._stripe.retrieve_setup_intent(intent_id)
        except StripeRequestFailed:
            return None

    async def _refund_reference(self, event: StripeEvent) -> str | None:
        """For a refund no purchase names the PaymentIntent of: its top-up's ledger key.

        Read from the PaymentIntent's metadata at Stripe, before the
        transaction opens (a purchase booked from its Checkout Session alone
        does not know the PaymentIntent yet).
        """
        charge = event.object
        if event.type != "charge.refunded" or not isinstance(charge, Charge):
            return None
        if charge.payment_intent_id is None or self._stripe is None:
            return None
        async with self._db.read() as conn:
            if await refunds.refunded_purchase(conn, charge) is not None:
                return None
        try:
            # StripeUnavailable propagates: nothing is written, Stripe retries.
            intent = await self._stripe.retrieve_payment_intent(charge.payment_intent_id)
        except StripeRequestFailed:
            return None
        return purchase_key(intent.metadata)

    async def _lock_key(self, event: StripeEvent, refund_key: str | None = None) -> str:
        """The practice a delivery concerns (its transactions serialise on it)."""
        if event.practice_id:
            return event.practice_id
        async with self._db.read() as conn:
            if event.type == "charge.refunded" and isinstance(event.object, Charge):
                entry = await refunds.refunded_purchase(conn, event.object, refund_key)
                if entry is not None:
                    return entry.practice_id
            elif (
                event.type in _SUBSCRIPTION_EVENTS
                and isinstance(event.object, Subscription)
                and event.object.id is not None
            ):
                value = await practice_of_subscription(conn, event.object.id)
                if value:
                    return value
        return f"stripe-event:{event.id}"

    async def _keep_receipt(self, event: StripeEvent) -> None:
        """After a paid top-up is credited: its invoice's or receipt's URL into its entry."""
        obj = event.object
        if event.practice_id is None or event.purpose not in (PURPOSE_TOPUP, PURPOSE_AUTO_TOPUP):
            return
        if isinstance(obj, CheckoutSession):
            await keep_receipt(
                self._db,
                self._stripe,
                practice_id=event.practice_id,
                checkout_session_id=obj.id,
                payment_intent_id=obj.payment_intent_id,
                invoice_id=obj.invoice_id,
                clock=self._clock,
            )
        elif isinstance(obj, PaymentIntent):
            await keep_receipt(
                self._db,
                self._stripe,
                practice_id=event.practice_id,
                payment_intent_id=obj.id,
                clock=self._clock,
            )

    async def handle(self, payload: bytes, signature: str | None) -> dict[str, Any]:
        event = self._verify(payload, signature)
        retrieved = await self._prefetch(event)
        refund_key = await self._refund_reference(event)
        lock = await self._lock_key(event, refund_key)
        handler = route(event)
        answer: dict[str, Any] = {"received": True, "event_type": event.type, "event_id": event.id}
        for attempt in range(2):
            try:
                async with self._db.transaction(lock=lock) as conn:
                    seen = await conn.fetchval(
                        "SELECT 1 FROM stripe_webhook_events WHERE event_id = ?", event.id
                    )
                    if seen:
                        return {**answer, "duplicate": True, "handled": False}
                    now = int(self._clock())
                    await conn.execute(
                        "INSERT INTO stripe_webhook_events (event_id, event_type, received_at) "
                        "VALUES (?, ?, ?)",
                        event.id,
                        event.type,
                        now,
                    )
                    delivery = Delivery(
                        event=event,
                        now=now,
                        config=self._config,
                        retrieved=retrieved,
                        refund_purchase_key=refund_key,
                    )
                    result = IGNORED if handler is None else await handler(conn, delivery)
            except UniqueViolation:
                # A concurrent delivery under another lock key committed first;
                # the second attempt sees its work and reports a duplicate.
                if attempt:
                    raise
                continue
            if result.credited:
                await self._keep_receipt(event)
            return {
                **answer,
                "duplicate": False,
                "handled": result.handled,
                "credited": result.credited,
                "result": result.to_dict(),
            }
        raise AssertionError("unreachable")  # pragma: no cover
