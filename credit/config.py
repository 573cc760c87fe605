"""Top-up constants and the configuration shape the credit package reads.

The values are the seed's (`aza_ai_credit`'s module constants): 30 CHF buys
10 USD of internal credit, auto top-up triggers below 5 %, at most 300 CHF of
automatic top-ups per calendar month (the practice's month: Europe/Zurich,
not UTC, so a top-up at 00:30 on the 1st counts in the new month), 24 h
between two automatic ones.
`gateway.settings.CreditConfig` has the same fields and is passed in as a
`CreditConfigLike` (structural typing: credit/ does not import gateway/).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

DEFAULT_TOPUP_AMOUNT_CHF = Decimal("30")
DEFAULT_INTERNAL_USD = Decimal("10")
DEFAULT_TRIGGER_PERCENT = 5
DEFAULT_MONTHLY_LIMIT_CHF = Decimal("300")
AUTO_TOPUP_COOLDOWN_SEC = 86_400
DEFAULT_TOPUP_SUCCESS_URL = "https://aza-medwork.ch/succes2"
DEFAULT_SETUP_SUCCESS_URL = "https://aza-medwork.ch/ki-topup-setup-success/"
DEFAULT_CANCEL_URL = "https://aza-medwork.ch"
# The zone whose calendar months the automatic top-up limit counts in.
DEFAULT_MONTH_TIMEZONE = "Europe/Zurich"


class CreditConfigLike(Protocol):
    """What credit/ reads from the configuration (read-only)."""

    @property
    def currency(self) -> str: ...
    @property
    def chf_per_internal_usd(self) -> Decimal: ...
    @property
    def default_topup_amount_chf(self) -> Decimal: ...
    @property
    def default_internal_usd(self) -> Decimal: ...
    @property
    def default_trigger_percent(self) -> int: ...
    @property
    def default_monthly_limit_chf(self) -> Decimal: ...
    @property
    def auto_topup_cooldown_seconds(self) -> int: ...
    @property
    def min_topup_chf(self) -> Decimal: ...
    @property
    def max_topup_chf(self) -> Decimal: ...
    @property
    def topup_success_url(self) -> str: ...
    @property
    def setup_success_url(self) -> str: ...
    @property
    def cancel_url(self) -> str: ...
    @property
    def month_timezone(self) -> str: ...
    @property
    def vat_rate(self) -> Decimal: ...
    @property
    def stripe_tax(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class CreditDefaults:
    """A `CreditConfigLike` with the seed's values (for tests and tools without gateway/)."""

    currency: str = "chf"
    chf_per_internal_usd: Decimal = Decimal("3")
    default_topup_amount_chf: Decimal = DEFAULT_TOPUP_AMOUNT_CHF
    default_internal_usd: Decimal = DEFAULT_INTERNAL_USD
    default_trigger_percent: int = DEFAULT_TRIGGER_PERCENT
    default_monthly_limit_chf: Decimal = DEFAULT_MONTHLY_LIMIT_CHF
    auto_topup_cooldown_seconds: int = AUTO_TOPUP_COOLDOWN_SEC
    min_topup_chf: Decimal = Decimal("10")
    max_topup_chf: Decimal = Decimal("1000")
    topup_success_url: str = DEFAULT_TOPUP_SUCCESS_URL
    setup_success_url: str = DEFAULT_SETUP_SUCCESS_URL
    cancel_url: str = DEFAULT_CANCEL_URL
    month_timezone: str = DEFAULT_MONTH_TIMEZONE
    vat_rate: Decimal = Decimal("0")
    stripe_tax: bool = False
