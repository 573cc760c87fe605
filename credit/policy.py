"""The automatic top-up guards: a pure decision on a snapshot of facts.

Order matters and follows the seed: the practice's own settings are judged
first (so a practice over its monthly limit hears that, even in dry run),
then the deployment's mode (feature flag, dry run, live-key allowance).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Action(StrEnum):
    CHARGE = "charge"
    DRY_RUN = "dry_run"
    SKIP = "skip"


class Reason(StrEnum):
    """Why an automatic top-up did not charge (`reason`, the seed's strings where it has them)."""

    DISABLED = "auto_topup_disabled"
    NO_PAYMENT_METHOD = "no_payment_method"
    ABOVE_TRIGGER = "above_trigger"
    MONTHLY_LIMIT = "auto_topup_monthly_limit_reached"
    PENDING = "pending_auto_topup"
    COOLDOWN = "cooldown_24h"
    FEATURE_OFF = "auto_topup_feature_off"
    DRY_RUN = "dry_run"
    LIVE_BLOCKED = "live_topup_blocked"
    STRIPE_NOT_CONFIGURED = "stripe_not_configured"
    REQUIRES_ACTION = "requires_action"
    PAYMENT_FAILED = "payment_failed"
    STRIPE_UNAVAILABLE = "stripe_unavailable"
    PROCESSING = "payment_processing"


# The upper-case code a client acts on, for each reason.
ERROR_CODES: dict[Reason, str] = {
    Reason.DISABLED: "AUTO_TOPUP_DISABLED",
    Reason.NO_PAYMENT_METHOD: "AUTO_TOPUP_NO_PAYMENT_METHOD",
    Reason.ABOVE_TRIGGER: "AUTO_TOPUP_ABOVE_TRIGGER",
    Reason.MONTHLY_LIMIT: "AUTO_TOPUP_MONTHLY_LIMIT_REACHED",
    Reason.PENDING: "AUTO_TOPUP_PENDING",
    Reason.COOLDOWN: "AUTO_TOPUP_COOLDOWN",
    Reason.FEATURE_OFF: "AUTO_TOPUP_DRY_RUN",
    Reason.DRY_RUN: "AUTO_TOPUP_DRY_RUN",
    Reason.LIVE_BLOCKED: "LIVE_TOPUP_BLOCKED",
    Reason.STRIPE_NOT_CONFIGURED: "STRIPE_NOT_CONFIGURED",
    Reason.REQUIRES_ACTION: "AUTO_TOPUP_REQUIRES_ACTION",
    Reason.PAYMENT_FAILED: "AUTO_TOPUP_PAYMENT_FAILED",
    Reason.STRIPE_UNAVAILABLE: "AUTO_TOPUP_STRIPE_UNAVAILABLE",
    Reason.PROCESSING: "AUTO_TOPUP_PENDING",
}


@dataclass(frozen=True, slots=True)
class AutoTopupFacts:
    """Everything the guards look at, read in one transaction."""

    # the practice's settings
    settings_enabled: bool
    has_customer: bool
    has_payment_method: bool
    trigger_below_percent: int
    available_percent: int
    # the ledger
    charge_rappen: int
    monthly_limit_rappen: int
    auto_topups_this_month_rappen: int
    pending: bool
    last_success_at: int | None
    now: int
    cooldown_seconds: int
    # the deployment
    feature_enabled: bool
    dry_run: bool
    live_key: bool
    allow_live: bool
    stripe_configured: bool


@dataclass(frozen=True, slots=True)
class Decision:
    """Charge, pretend (dry run), or skip, and why."""

    action: Action
    reason: Reason | None = None

    @property
    def error_code(self) -> str | None:
        return None if self.reason is None else ERROR_CODES[self.reason]


def decide_auto_topup(facts: AutoTopupFacts) -> Decision:
    """Whether an automatic top-up may charge now; the first guard that fails decides."""
    if not facts.settings_enabled:
        return Decision(Action.SKIP, Reason.DISABLED)
    if not (facts.has_customer and facts.has_payment_method):
        return Decision(Action.SKIP, Reason.NO_PAYMENT_METHOD)
    if facts.available_percent >= facts.trigger_below_percent:
        return Decision(Action.SKIP, Reason.ABOVE_TRIGGER)
    if facts.auto_topups_this_month_rappen + facts.charge_rappen > facts.monthly_limit_rappen:
        return Decision(Action.SKIP, Reason.MONTHLY_LIMIT)
    if facts.pending:
        return Decision(Action.SKIP, Reason.PENDING)
    if (
        facts.last_success_at is not None
        and facts.now - facts.last_success_at < facts.cooldown_seconds
    ):
        return Decision(Action.SKIP, Reason.COOLDOWN)
    if not facts.feature_enabled:
        return Decision(Action.DRY_RUN, Reason.FEATURE_OFF)
    if facts.dry_run:
        return Decision(Action.DRY_RUN, Reason.DRY_RUN)
    if facts.live_key and not facts.allow_live:
        return Decision(Action.SKIP, Reason.LIVE_BLOCKED)
    if not facts.stripe_configured:
        return Decision(Action.SKIP, Reason.STRIPE_NOT_CONFIGURED)
    return Decision(Action.CHARGE)
