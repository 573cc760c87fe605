"""What every webhook handler takes and returns.

A handler is `async (conn, delivery) -> HandlerResult`: it runs inside the
delivery's transaction (its event id recorded in the same one), and the
routing table of `credit.webhooks` picks it by event type and purpose.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from credit.config import CreditConfig
from credit.ports import Connection
from credit.stripe_events import StripeEvent
from credit.stripe_port import SetupIntentResult


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


@dataclass(frozen=True, slots=True)
class Delivery:
    """An event as a handler gets it: with the time, the config, and what Stripe
    answered before the transaction opened (a SetupIntent a session named by id)."""

    event: StripeEvent
    now: int
    config: CreditConfig
    retrieved: SetupIntentResult | None = None
    # A refunded charge's top-up, found by the reference on its PaymentIntent
    # (retrieved from Stripe) when no purchase names that PaymentIntent yet.
    refund_purchase_key: str | None = None


Handler = Callable[[Connection, Delivery], Awaitable[HandlerResult]]
