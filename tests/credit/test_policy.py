"""The automatic top-up guards as a pure function of facts (no database, no Stripe)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from credit.policy import Action, AutoTopupFacts, Reason, decide_auto_topup

NOW = 1_750_000_000

GO = AutoTopupFacts(
    settings_enabled=True,
    has_customer=True,
    has_payment_method=True,
    trigger_below_percent=10,
    available_percent=5,
    charge_rappen=3000,
    monthly_limit_rappen=30000,
    auto_topups_this_month_rappen=0,
    pending=False,
    last_success_at=None,
    now=NOW,
    cooldown_seconds=86_400,
    feature_enabled=True,
    dry_run=False,
    live_key=False,
    allow_live=False,
    stripe_configured=True,
)


def test_all_guards_pass_charges() -> None:
    """With every guard satisfied the decision is to charge, without a reason."""
    decision = decide_auto_topup(GO)
    assert decision.action is Action.CHARGE
    assert decision.reason is None and decision.error_code is None


@pytest.mark.parametrize(
    ("change", "reason", "code"),
    [
        ({"settings_enabled": False}, Reason.DISABLED, "AUTO_TOPUP_DISABLED"),
        ({"has_payment_method": False}, Reason.NO_PAYMENT_METHOD, "AUTO_TOPUP_NO_PAYMENT_METHOD"),
        ({"has_customer": False}, Reason.NO_PAYMENT_METHOD, "AUTO_TOPUP_NO_PAYMENT_METHOD"),
        ({"available_percent": 10}, Reason.ABOVE_TRIGGER, "AUTO_TOPUP_ABOVE_TRIGGER"),
        (
            {"auto_topups_this_month_rappen": 27001},
            Reason.MONTHLY_LIMIT,
            "AUTO_TOPUP_MONTHLY_LIMIT_REACHED",
        ),
        ({"pending": True}, Reason.PENDING, "AUTO_TOPUP_PENDING"),
        ({"last_success_at": NOW - 3600}, Reason.COOLDOWN, "AUTO_TOPUP_COOLDOWN"),
        ({"live_key": True}, Reason.LIVE_BLOCKED, "LIVE_TOPUP_BLOCKED"),
        ({"stripe_configured": False}, Reason.STRIPE_NOT_CONFIGURED, "STRIPE_NOT_CONFIGURED"),
    ],
)
def test_each_guard_skips_with_reason_and_code(change: dict, reason: Reason, code: str) -> None:
    """Each guard alone stops the charge with its reason string and upper-case code."""
    decision = decide_auto_topup(replace(GO, **change))
    assert decision.action is Action.SKIP
    assert decision.reason is reason
    assert decision.error_code == code


def test_limit_counts_this_charge() -> None:
    """The monthly limit allows reaching it exactly, not exceeding it."""
    assert (
        decide_auto_topup(replace(GO, auto_topups_this_month_rappen=27000)).action is Action.CHARGE
    )


def test_cooldown_ends_after_24h() -> None:
    """A success more than 24 h ago no longer blocks."""
    facts = replace(GO, last_success_at=NOW - 86_400)
    assert decide_auto_topup(facts).action is Action.CHARGE


def test_settings_guards_come_before_dry_run() -> None:
    """Over the monthly limit in dry run, the answer is the limit (the seed's order)."""
    facts = replace(GO, dry_run=True, auto_topups_this_month_rappen=6000, monthly_limit_rappen=6000)
    assert decide_auto_topup(facts).reason is Reason.MONTHLY_LIMIT


def test_feature_off_is_a_dry_run() -> None:
    """With the feature flag off, an allowed top-up becomes a dry run (seed: env off → dry_run)."""
    decision = decide_auto_topup(replace(GO, feature_enabled=False))
    assert decision.action is Action.DRY_RUN
    assert decision.error_code == "AUTO_TOPUP_DRY_RUN"


def test_dry_run_before_live_guard() -> None:
    """Dry run pretends even with a live key: nothing could be charged anyway."""
    decision = decide_auto_topup(replace(GO, dry_run=True, live_key=True))
    assert decision.action is Action.DRY_RUN
    assert decision.reason is Reason.DRY_RUN


def test_live_key_with_allowance_charges() -> None:
    """A live key charges once AZA_AI_TOPUP_ALLOW_LIVE is on."""
    assert decide_auto_topup(replace(GO, live_key=True, allow_live=True)).action is Action.CHARGE
