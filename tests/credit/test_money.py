"""CHF → internal USD and amount parsing (pure, no database)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from credit.config import (
    AUTO_TOPUP_COOLDOWN_SEC,
    DEFAULT_INTERNAL_USD,
    DEFAULT_MONTHLY_LIMIT_CHF,
    DEFAULT_SETUP_SUCCESS_URL,
    DEFAULT_TOPUP_SUCCESS_URL,
    DEFAULT_TRIGGER_PERCENT,
    CreditDefaults,
)
from credit.money import (
    InvalidAmount,
    chf_to_internal_micros,
    chf_to_internal_usd,
    parse_chf,
    parse_usd,
    refund_share_micros,
)


def test_chf30_gives_10_usd() -> None:
    """30 CHF buy exactly 10 internal USD (seed rate 3)."""
    assert chf_to_internal_usd(30) == Decimal("10")
    assert chf_to_internal_micros(30) == 10_000_000


def test_chf10_gives_3333_usd() -> None:
    """10 CHF buy 3.333333 USD, rounded half-even to the micro-USD."""
    assert chf_to_internal_usd(10) == Decimal("3.333333")


def test_custom_amount_formula() -> None:
    """Any amount converts at CHF/3: 45 → 15, 50 → 16.666667, 300 → 100."""
    assert chf_to_internal_usd(45) == Decimal("15")
    assert chf_to_internal_usd(50) == Decimal("16.666667")
    assert chf_to_internal_usd(300) == Decimal("100")
    assert chf_to_internal_usd(Decimal("22.50")) == Decimal("7.5")


def test_rate_is_configurable() -> None:
    """A different configured rate is used as given (no float detour)."""
    assert chf_to_internal_usd(Decimal("30"), Decimal("1.5")) == Decimal("20")


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", float("nan"), float("inf"), "abc", "", True])
def test_parse_chf_rejects_non_numbers(bad: object) -> None:
    """NaN, infinities, text and booleans are not CHF amounts."""
    with pytest.raises(InvalidAmount):
        parse_chf(bad)  # type: ignore[arg-type]


def test_parse_chf_rejects_fractional_rappen() -> None:
    """An amount with more than 2 decimal places is refused, not rounded."""
    with pytest.raises(InvalidAmount):
        parse_chf("30.005")
    assert parse_chf("30.50") == Decimal("30.50")
    assert parse_chf(30.1) == Decimal("30.1")


def test_parse_usd_allows_micro_usd_only() -> None:
    """USD input is exact to the micro-USD."""
    assert parse_usd("-1.234567") == Decimal("-1.234567")
    with pytest.raises(InvalidAmount):
        parse_usd("1.0000001")


def test_refund_share_at_original_rate() -> None:
    """A refund takes credit in proportion to the original payment, a full one all of it."""
    assert refund_share_micros(20_000_000, 3000, 1500) == 10_000_000
    assert refund_share_micros(3_333_333, 1000, 1000) == 3_333_333
    assert refund_share_micros(3_333_333, 1000, 500) == 1_666_666  # half-even of .5
    assert refund_share_micros(3_333_333, 1000, 5000) == 3_333_333  # never more than credited


def test_default_product_constants() -> None:
    """The seed's constants: 10 USD, 300 CHF monthly limit, 5 % trigger, 24 h cooldown."""
    assert Decimal("10") == DEFAULT_INTERNAL_USD
    assert Decimal("300") == DEFAULT_MONTHLY_LIMIT_CHF
    assert DEFAULT_TRIGGER_PERCENT == 5
    assert AUTO_TOPUP_COOLDOWN_SEC == 86_400
    defaults = CreditDefaults()
    assert defaults.chf_per_internal_usd == Decimal("3")
    assert defaults.default_topup_amount_chf == Decimal("30")


def test_setup_success_url_constant() -> None:
    """The seed's setup success URL, and the top-up one (succes2) differs from it."""
    assert DEFAULT_SETUP_SUCCESS_URL == "https://aza-medwork.ch/ki-topup-setup-success/"
    assert DEFAULT_TOPUP_SUCCESS_URL == "https://aza-medwork.ch/succes2"
    assert DEFAULT_TOPUP_SUCCESS_URL != DEFAULT_SETUP_SUCCESS_URL


def test_gateway_credit_config_matches_credit_defaults() -> None:
    """gateway.settings.CreditConfig (what the app passes in) has the same defaults as credit's."""
    from dataclasses import fields

    from gateway.settings import CreditConfig

    ours, theirs = CreditDefaults(), CreditConfig()
    for f in fields(CreditDefaults):
        assert getattr(theirs, f.name) == getattr(ours, f.name), f.name
