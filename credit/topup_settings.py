"""A practice's top-up settings (table `ai_topup_settings`).

Stored as integers (Rappen, micro-USD), handled as `Decimal` CHF / USD. A
practice without a row has the seed's defaults with auto top-up off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from credit.config import CreditConfig
from credit.money import chf_to_rappen, micros_to_usd, rappen_to_chf, usd_to_micros
from credit.ports import Connection, Row


@dataclass(frozen=True, slots=True)
class TopupSettings:
    """Auto top-up settings of one practice (amounts exact, in CHF and internal USD)."""

    practice_id: str
    auto_topup_enabled: bool
    topup_amount_chf: Decimal
    internal_credit_usd: Decimal
    trigger_below_percent: int
    monthly_limit_chf: Decimal
    stripe_customer_id: str | None = None
    # Not a secret, but never shown or logged: repr hides it.
    default_payment_method_id: str | None = field(default=None, repr=False)
    paused_reason: str | None = None

    @property
    def payment_method_configured(self) -> bool:
        """True when an off-session charge is possible: customer AND payment method saved."""
        return bool(self.stripe_customer_id) and bool(self.default_payment_method_id)

    @property
    def topup_amount_rappen(self) -> int:
        return chf_to_rappen(self.topup_amount_chf)

    @property
    def internal_credit_micros(self) -> int:
        return usd_to_micros(self.internal_credit_usd)

    @property
    def monthly_limit_rappen(self) -> int:
        return chf_to_rappen(self.monthly_limit_chf)


def default_settings(practice_id: str, config: CreditConfig) -> TopupSettings:
    """The settings of a practice that never saved any: the configured defaults, auto off."""
    return TopupSettings(
        practice_id=practice_id,
        auto_topup_enabled=False,
        topup_amount_chf=config.default_topup_amount_chf,
        internal_credit_usd=config.default_internal_usd,
        trigger_below_percent=config.default_trigger_percent,
        monthly_limit_chf=config.default_monthly_limit_chf,
    )


def _from_row(row: Row) -> TopupSettings:
    return TopupSettings(
        practice_id=str(row["practice_id"]),
        auto_topup_enabled=bool(row["auto_topup_enabled"]),
        topup_amount_chf=rappen_to_chf(int(row["topup_amount_rappen"])),
        internal_credit_usd=micros_to_usd(int(row["internal_credit_micro_usd"])),
        trigger_below_percent=int(row["trigger_below_percent"]),
        monthly_limit_chf=rappen_to_chf(int(row["monthly_limit_rappen"])),
        stripe_customer_id=row["stripe_customer_id"],
        default_payment_method_id=row["default_payment_method_id"],
        paused_reason=row["paused_reason"],
    )


async def load_settings(conn: Connection, practice_id: str, config: CreditConfig) -> TopupSettings:
    """The practice's saved settings, or the defaults when it has none."""
    row = await conn.fetchone(
        "SELECT practice_id, auto_topup_enabled, topup_amount_rappen, internal_credit_micro_usd, "
        "trigger_below_percent, monthly_limit_rappen, stripe_customer_id, "
        "default_payment_method_id, paused_reason FROM ai_topup_settings WHERE practice_id = ?",
        practice_id,
    )
    return default_settings(practice_id, config) if row is None else _from_row(row)


async def save_settings(conn: Connection, settings: TopupSettings, *, now: int) -> None:
    """Insert or replace the practice's settings row."""
    await conn.execute(
        "INSERT INTO ai_topup_settings (practice_id, auto_topup_enabled, topup_amount_rappen, "
        "internal_credit_micro_usd, trigger_below_percent, monthly_limit_rappen, "
        "stripe_customer_id, default_payment_method_id, paused_reason, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (practice_id) DO UPDATE SET "
        "auto_topup_enabled = excluded.auto_topup_enabled, "
        "topup_amount_rappen = excluded.topup_amount_rappen, "
        "internal_credit_micro_usd = excluded.internal_credit_micro_usd, "
        "trigger_below_percent = excluded.trigger_below_percent, "
        "monthly_limit_rappen = excluded.monthly_limit_rappen, "
        "stripe_customer_id = excluded.stripe_customer_id, "
        "default_payment_method_id = excluded.default_payment_method_id, "
        "paused_reason = excluded.paused_reason, updated_at = excluded.updated_at",
        settings.practice_id,
        1 if settings.auto_topup_enabled else 0,
        settings.topup_amount_rappen,
        settings.internal_credit_micros,
        settings.trigger_below_percent,
        settings.monthly_limit_rappen,
        settings.stripe_customer_id,
        settings.default_payment_method_id,
        settings.paused_reason,
        now,
    )
