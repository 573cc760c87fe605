"""Alert types and the JSON body every channel is built from (pure).

An alert carries amounts, thresholds and references (a ledger id, a key's
prefix, a device id), never a key, a payment method id or prompt content.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

from budget.money import micros_to_usd, rappen_to_chf


class AlertType(StrEnum):
    """The `type` of an alert (the names the triggers of migration 012 write)."""

    BUDGET_THRESHOLD_CROSSED = "budget.threshold_crossed"
    CREDIT_LOW = "credit.low"
    KEY_CAP_NEAR = "key.cap_near"
    TOPUP_SUCCEEDED = "topup.succeeded"
    AUTO_TOPUP_FAILED = "auto_topup.failed"
    AUTO_TOPUP_PAUSED = "auto_topup.paused"
    PAYMENT_ACTION_REQUIRED = "payment.action_required"


# Alerts a client app can show as a banner (the budget route's `alerts_pending`).
BANNER_TYPES = (
    AlertType.BUDGET_THRESHOLD_CROSSED,
    AlertType.CREDIT_LOW,
    AlertType.KEY_CAP_NEAR,
    AlertType.AUTO_TOPUP_PAUSED,
    AlertType.PAYMENT_ACTION_REQUIRED,
)


def usd_text(micros: int) -> str:
    """Micro-USD as a decimal string with at least two places ("12.50", "0.000125")."""
    value = micros_to_usd(micros).normalize()
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        value = value.quantize(Decimal("0.01"))
    return format(value, "f")


@dataclass(frozen=True, slots=True)
class Alert:
    """One row of the outbox: what happened, to which practice, with its numbers."""

    id: str
    practice_id: str
    type: AlertType
    created: int
    period_start: int | None = None
    threshold: int | None = None
    amount_micros: int | None = None
    limit_micros: int | None = None
    paid_rappen: int | None = None
    subject: str | None = None
    reason: str | None = None

    def data(self) -> dict[str, Any]:
        """The type's facts for `data` (amounts as decimal strings)."""
        kind = self.type
        if kind is AlertType.BUDGET_THRESHOLD_CROSSED:
            return {
                "threshold_percent": self.threshold,
                "period_start": self.period_start,
                "budget_usd": usd_text(self.limit_micros or 0),
                "used_usd": usd_text(self.amount_micros or 0),
            }
        if kind is AlertType.CREDIT_LOW:
            return {
                "threshold_usd": usd_text(self.limit_micros or 0),
                "extra_credit_usd": usd_text(self.amount_micros or 0),
            }
        if kind is AlertType.KEY_CAP_NEAR:
            subject_field = "device_id" if self.reason == "device" else "key_prefix"
            return {
                subject_field: self.subject,
                "threshold_percent": self.threshold,
                "period_start": self.period_start,
                "monthly_cap_usd": usd_text(self.limit_micros or 0),
                "used_usd": usd_text(self.amount_micros or 0),
            }
        if kind is AlertType.TOPUP_SUCCEEDED:
            return {
                "ledger_id": int(self.subject or 0),
                "automatic": self.reason == "auto_topup_purchase",
                "credit_usd": usd_text(self.amount_micros or 0),
                "paid_chf": None
                if self.paid_rappen is None
                else format(rappen_to_chf(self.paid_rappen), "f"),
            }
        if kind is AlertType.AUTO_TOPUP_FAILED:
            return {
                "ledger_id": int(self.subject or 0),
                "reason": self.reason,
                "amount_chf": None
                if self.paid_rappen is None
                else format(rappen_to_chf(self.paid_rappen), "f"),
            }
        return {"reason": self.reason}

    def body(self) -> dict[str, Any]:
        """The webhook's JSON body (the same for every delivery attempt of this alert)."""
        return {
            "id": self.id,
            "type": str(self.type),
            "created": self.created,
            "practice_id": self.practice_id,
            "data": self.data(),
        }
