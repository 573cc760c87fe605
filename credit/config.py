"""The credit configuration: one frozen object, every default in config/defaults.toml.

The values are the seed's (`aza_ai_credit`'s module constants), written
once, in `[credit]` of config/defaults.toml: 30 CHF buys 10 USD of internal
credit, auto top-up triggers below 5 %, at most 300 CHF of automatic top-ups
per calendar month (the practice's month: Europe/Zurich, not UTC, so a
top-up at 00:30 on the 1st counts in the new month), 24 h between two
automatic ones. `gateway.settings` fills it once at start (a deployment's
own defaults.toml may override any key) and passes it in; `defaults()` is
the shipped file's, for tests and tools without the gateway.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any

from budget.money import parse_decimal
from config import CONFIG_DIR


@dataclass(frozen=True, slots=True)
class CreditConfig:
    """Top-up rules and Stripe return URLs (amounts in CHF or internal USD)."""

    currency: str
    chf_per_internal_usd: Decimal
    default_topup_amount_chf: Decimal
    default_internal_usd: Decimal
    default_trigger_percent: int
    default_monthly_limit_chf: Decimal
    auto_topup_cooldown_seconds: int
    min_topup_chf: Decimal
    max_topup_chf: Decimal
    topup_success_url: str
    setup_success_url: str
    cancel_url: str
    month_timezone: str  # the auto top-up limit's calendar month
    # VAT in percent included in every top-up's CHF price (8.1: Swiss standard
    # rate), shown on the Checkout invoice and receipts; 0: none. With
    # stripe_tax, Stripe Tax computes it instead (the operator enables it in Stripe).
    vat_rate: Decimal
    stripe_tax: bool

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, base: CreditConfig | None = None
    ) -> CreditConfig:
        """A config of `[credit]` values; keys it lacks come from `base` (required without)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in data:
                raw = data[f.name]
                values[f.name] = parse_decimal(raw, what=f.name) if f.type == "Decimal" else raw
            elif base is not None:
                values[f.name] = getattr(base, f.name)
            else:
                raise ValueError(f"[credit] {f.name} is missing")
        return cls(**values)

    @classmethod
    @functools.cache
    def defaults(cls) -> CreditConfig:
        """The shipped defaults (config/defaults.toml, `[credit]`)."""
        with (CONFIG_DIR / "defaults.toml").open("rb") as handle:
            return cls.from_mapping(tomllib.load(handle)["credit"])
