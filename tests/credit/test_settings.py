"""Auto top-up settings through CreditService (both engines)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from credit.config import CreditConfig
from credit.errors import CreditError
from credit.ports import Database
from credit.topup_settings import load_settings
from gateway.errors import credit_status

from .helpers import PRACTICE, count, save, service


async def _load(db: Database, practice: str = PRACTICE) -> Any:
    async with db.read() as conn:
        return await load_settings(conn, practice, CreditConfig.defaults())


async def test_auto_topup_settings_save(db: Database) -> None:
    """Saved settings read back exactly (Decimal CHF/USD, ids, flag)."""
    await save(
        db,
        enabled=True,
        amount="30",
        credit="10",
        trigger=10,
        limit="300",
        customer=None,
        payment_method=None,
    )
    loaded = await _load(db)
    assert loaded.auto_topup_enabled is True
    assert loaded.monthly_limit_chf == Decimal("300")
    assert loaded.topup_amount_chf == Decimal("30")
    assert loaded.internal_credit_usd == Decimal("10")
    assert loaded.trigger_below_percent == 10


async def test_default_trigger_percent_is_5(db: Database) -> None:
    """A practice without a row gets the seed's defaults with auto top-up off."""
    loaded = await _load(db, "prac_new_defaults")
    assert loaded.trigger_below_percent == 5
    assert loaded.topup_amount_chf == Decimal("30")
    assert loaded.internal_credit_usd == Decimal("10")
    assert loaded.monthly_limit_chf == Decimal("300")
    assert loaded.auto_topup_enabled is False
    status = await service(db).settings_status("prac_new_defaults")
    assert status["trigger_below_percent"] == 5 and status["auto_topup_enabled"] is False


async def test_payment_method_configured_requires_cus_and_pm(db: Database) -> None:
    """payment_method_configured needs a customer AND a payment method."""
    svc = service(db)
    await save(db, customer=None, payment_method="pm_only")
    assert (await svc.settings_status(PRACTICE))["payment_method_configured"] is False
    await save(db, customer="cus_only", payment_method=None)
    assert (await svc.settings_status(PRACTICE))["payment_method_configured"] is False
    await save(db, customer="cus_ok", payment_method="pm_ok")
    assert (await svc.settings_status(PRACTICE))["payment_method_configured"] is True


async def test_auto_topup_settings_status_masks_payment_method(db: Database) -> None:
    """The status says a card is configured but never shows its id."""
    await save(db, trigger=5, customer="cus_x", payment_method="pm_secret123")
    status = await service(db).settings_status(PRACTICE)
    assert status["ok"] is True
    assert status["auto_topup_enabled"] is True
    assert status["payment_method_configured"] is True
    assert status["trigger_below_percent"] == 5
    assert "default_payment_method_id" not in status
    assert "pm_secret123" not in json.dumps(status)
    assert set(status) >= {
        "topup_amount_chf",
        "internal_credit_usd",
        "monthly_limit_chf",
        "auto_topups_chf_this_month",
        "paused_reason",
    }
    settings = await _load(db)
    assert "pm_secret123" not in repr(settings)


async def test_disable_auto_topup_preserves_payment_method(db: Database) -> None:
    """Switching auto top-up off keeps customer and card and writes no ledger row."""
    await save(db, trigger=5, customer="cus_keep", payment_method="pm_keep")
    result = await service(db).update_settings(PRACTICE, enabled=False)
    assert result["ok"] is True and result["auto_topup_enabled"] is False
    loaded = await _load(db)
    assert loaded.auto_topup_enabled is False
    assert (loaded.stripe_customer_id, loaded.default_payment_method_id) == ("cus_keep", "pm_keep")
    assert await count(db, "SELECT COUNT(1) FROM ai_credit_ledger") == 0


async def test_enable_auto_topup_without_payment_method_blocked(db: Database) -> None:
    """Enabling without a saved card is refused with AUTO_TOPUP_NO_PAYMENT_METHOD; nothing saved."""
    with pytest.raises(CreditError) as info:
        await service(db).update_settings(PRACTICE, enabled=True)
    assert info.value.error_code == "AUTO_TOPUP_NO_PAYMENT_METHOD"
    assert credit_status(info.value) == 409
    assert (await _load(db)).auto_topup_enabled is False
    assert await count(db, "SELECT COUNT(*) FROM ai_topup_settings") == 0


async def test_enable_clears_pause(db: Database) -> None:
    """Re-enabling after a failure pause clears paused_reason."""
    await save(db, enabled=False)
    async with db.transaction() as conn:
        await conn.execute(
            "UPDATE ai_topup_settings SET paused_reason = 'AUTO_TOPUP_PAYMENT_FAILED'"
        )
    result = await service(db).update_settings(PRACTICE, enabled=True)
    assert result["auto_topup_enabled"] is True and result["paused_reason"] is None


async def test_update_amount_recomputes_credit_at_current_rate(db: Database) -> None:
    """A new top-up amount sets the credit it buys (45 CHF → 15 USD), other fields kept."""
    result = await service(db).update_settings(
        PRACTICE,
        topup_amount_chf=Decimal("45"),
        trigger_below_percent=20,
        monthly_limit_chf=Decimal("450"),
    )
    assert result["topup_amount_chf"] == 45.0
    assert result["internal_credit_usd"] == 15.0
    assert result["trigger_below_percent"] == 20
    assert result["monthly_limit_chf"] == 450.0
    assert (await _load(db)).internal_credit_usd == Decimal("15")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"topup_amount_chf": Decimal("NaN")}, "topup_amount_chf"),
        ({"topup_amount_chf": Decimal("-30")}, "topup_amount_chf"),
        ({"topup_amount_chf": Decimal("5")}, "topup_amount_chf"),
        ({"topup_amount_chf": Decimal("1e9")}, "topup_amount_chf"),
        ({"trigger_below_percent": 0}, "trigger_below_percent"),
        ({"trigger_below_percent": 101}, "trigger_below_percent"),
        ({"monthly_limit_chf": Decimal("0")}, "monthly_limit_chf"),
        ({"monthly_limit_chf": Decimal("20")}, "monthly_limit_chf"),  # below one top-up
    ],
)
async def test_update_settings_rejects_invalid_values(
    db: Database, kwargs: dict[str, Any], param: str
) -> None:
    """Invalid values are 422s naming the field; nothing is saved."""
    with pytest.raises(CreditError) as info:
        await service(db).update_settings(PRACTICE, **kwargs)
    assert credit_status(info.value) == 422
    assert info.value.param == param
    assert info.value.message_user
    assert await count(db, "SELECT COUNT(*) FROM ai_topup_settings") == 0
