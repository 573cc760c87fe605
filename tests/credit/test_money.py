"""CHF → internal USD and amount parsing (pure, no database)."""

from __future__ import annotations

import shutil
from decimal import Decimal
from pathlib import Path

import pytest

from config import CONFIG_DIR
from credit.config import CreditConfig
from credit.money import (
    InvalidAmount,
    chf_to_internal_micros,
    chf_to_internal_usd,
    parse_chf,
    parse_usd,
    refund_share_micros,
)

RATE = CreditConfig.defaults().chf_per_internal_usd  # the shipped rate, 3


def test_chf30_gives_10_usd() -> None:
    """30 CHF buy exactly 10 internal USD (seed rate 3)."""
    assert chf_to_internal_usd(30, RATE) == Decimal("10")
    assert chf_to_internal_micros(30, RATE) == 10_000_000


def test_chf10_gives_3333_usd() -> None:
    """10 CHF buy 3.333333 USD, rounded half-even to the micro-USD."""
    assert chf_to_internal_usd(10, RATE) == Decimal("3.333333")


def test_custom_amount_formula() -> None:
    """Any amount converts at CHF/3: 45 → 15, 50 → 16.666667, 300 → 100."""
    assert chf_to_internal_usd(45, RATE) == Decimal("15")
    assert chf_to_internal_usd(50, RATE) == Decimal("16.666667")
    assert chf_to_internal_usd(300, RATE) == Decimal("100")
    assert chf_to_internal_usd(Decimal("22.50"), RATE) == Decimal("7.5")


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
    defaults = CreditConfig.defaults()
    assert defaults.default_internal_usd == Decimal("10")
    assert defaults.default_monthly_limit_chf == Decimal("300")
    assert defaults.default_trigger_percent == 5
    assert defaults.auto_topup_cooldown_seconds == 86_400
    assert defaults.chf_per_internal_usd == Decimal("3")
    assert defaults.default_topup_amount_chf == Decimal("30")


def test_setup_success_url_constant() -> None:
    """The seed's setup success URL, and the top-up one (succes2) differs from it."""
    defaults = CreditConfig.defaults()
    assert defaults.setup_success_url == "https://aza-medwork.ch/ki-topup-setup-success/"
    assert defaults.topup_success_url == "https://aza-medwork.ch/succes2"


def _folder_with_credit(folder: Path, line: str) -> Path:
    """A config folder like the shipped one whose defaults.toml [credit] has only `line`."""
    for entry in CONFIG_DIR.glob("*.toml"):
        shutil.copy(entry, folder / entry.name)
    (folder / "defaults.toml").write_text(f"[credit]\n{line}\n", encoding="utf-8")
    return folder


def test_gateway_settings_carry_the_credit_defaults(tmp_path: Path) -> None:
    """The gateway's settings (from the environment and config files) hold credit's one config."""
    from gateway.settings import Settings

    assert Settings().credit == CreditConfig.defaults()
    assert Settings.from_env({}).credit == CreditConfig.defaults()
    overridden = Settings.from_env(
        {}, config_dir=_folder_with_credit(tmp_path, 'cancel_url = "https://x.test"')
    )
    assert overridden.credit.cancel_url == "https://x.test"
    assert overridden.credit.currency == CreditConfig.defaults().currency
