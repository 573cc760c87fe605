"""Subscriptions: `customer.subscription.*` keeps the practice's license row current.

Written through the one license store (`credit.licenses`), whose upsert
keeps the newest event's state: Stripe does not deliver events in order and
retries old deliveries, so an older event changes nothing and is handled
with reason `stale_event`.
"""

from __future__ import annotations

import logging

from credit.licenses import (
    FINAL_SUBSCRIPTION_STATUSES,
    LicenseWrite,
    practice_of_subscription,
    write_license,
)
from credit.ports import Connection
from credit.stripe_events import Subscription
from credit.webhook_handling import Delivery, HandlerResult

log = logging.getLogger("credit.webhooks")

STALE_EVENT = "stale_event"


async def subscription_event(conn: Connection, delivery: Delivery) -> HandlerResult:
    """Keep `licenses` in sync with a Stripe subscription (status, plan, period)."""
    sub = delivery.event.object
    assert isinstance(sub, Subscription)
    if sub.id is None:
        return HandlerResult(handled=False, reason="invalid_subscription")
    existing = await practice_of_subscription(conn, sub.id)
    practice_id = delivery.event.metadata.get("practice_id") or existing
    if not practice_id:
        log.warning("subscription event for an unknown practice ignored")
        return HandlerResult(handled=False, reason="unknown_practice")
    status = sub.status
    if delivery.event.type.endswith(".deleted") and status not in FINAL_SUBSCRIPTION_STATUSES:
        status = "canceled"
    changed = await write_license(
        conn,
        LicenseWrite(
            subscription_id=sub.id,
            practice_id=str(practice_id),
            customer_id=sub.customer_id,
            status=status,
            lookup_key=sub.lookup_key,
            period_start=sub.period_start,
            period_end=sub.period_end,
            stripe_event_created=delivery.event.created,
        ),
        now=delivery.now,
    )
    if not changed:
        log.info("out-of-order subscription event ignored (the license holds a newer state)")
        return HandlerResult(handled=True, reason=STALE_EVENT)
    return HandlerResult(handled=True)
