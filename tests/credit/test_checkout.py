"""Manual top-up and card-setup Checkout through the real Stripe adapter, Stripe faked by respx."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest
import respx

from credit.config import CreditConfig
from credit.errors import CreditError
from credit.ledger import EventType
from credit.ports import Database
from gateway.errors import credit_status

from .helpers import (
    PRACTICE,
    STRIPE_BASE,
    STRIPE_HTTPX_DEPRECATION,
    SUBSCRIPTION,
    book,
    count,
    form,
    save,
    service,
    stripe_adapter,
)

pytestmark = pytest.mark.filterwarnings(STRIPE_HTTPX_DEPRECATION)


@pytest.fixture
def stripe_api() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=STRIPE_BASE, assert_all_called=False) as router:
        router.post("/v1/checkout/sessions").mock(
            return_value=httpx.Response(
                200,
                json={
                    "id": "cs_test_123",
                    "object": "checkout.session",
                    "url": "https://checkout.stripe.test/pay/cs_test_123",
                },
            )
        )
        yield router


async def test_topup_checkout_dry_run(db: Database, stripe_api: respx.MockRouter) -> None:
    """Dry run answers dry_run true, no URL, and calls Stripe not at all."""
    r = await service(db, stripe=stripe_adapter(), dry_run=True).create_topup_checkout(
        PRACTICE, subscription_id=SUBSCRIPTION, customer_email="cli@example.test", amount_chf=30
    )
    assert r["dry_run"] is True and r["ok"] is True
    assert r["checkout_url"] is None and r["url"] is None
    assert r["paid_chf"] == 30.0 and r["internal_credit_usd"] == 10.0
    assert not stripe_api.calls


async def test_setup_session_dry_run_no_charge(db: Database, stripe_api: respx.MockRouter) -> None:
    """Setup in dry run: dry_run true, checkout_url present and None, no Stripe call."""
    r = await service(db, stripe=stripe_adapter(), dry_run=True).create_setup_checkout(
        PRACTICE, customer_email="cli@example.test", success_url="https://example/s"
    )
    assert r["dry_run"] is True
    assert r["checkout_url"] is None
    assert not stripe_api.calls


async def test_setup_session_response_has_checkout_url_field(db: Database) -> None:
    """The setup answer has ok and the checkout_url key (with setup_url and url aliases)."""
    r = await service(db, dry_run=True).create_setup_checkout(PRACTICE, customer_email=None)
    assert r["ok"] is True
    assert {"checkout_url", "setup_url", "url"} <= set(r)


async def test_topup_checkout_request_stripe_receives(
    db: Database, stripe_api: respx.MockRouter
) -> None:
    """A live top-up sends mode payment, CHF Rappen, the seed's metadata and the succes2 URL."""
    svc = service(db, stripe=stripe_adapter(), live_key=True, allow_live=True)
    r = await svc.create_topup_checkout(
        PRACTICE,
        subscription_id=SUBSCRIPTION,
        customer_email="cli@example.test",
        amount_chf="45",
    )
    assert (
        r["checkout_url"]
        == r["url"]
        == r["setup_url"]
        == "https://checkout.stripe.test/pay/cs_test_123"
    )
    assert r["session_id"] == "cs_test_123" and r["dry_run"] is False
    sent = form(stripe_api.calls.last.request)
    assert sent["mode"] == "payment"
    assert sent["success_url"] == "https://aza-medwork.ch/succes2"
    assert sent["cancel_url"] == "https://aza-medwork.ch"
    assert sent["line_items[0][price_data][currency]"] == "chf"
    assert sent["line_items[0][price_data][unit_amount]"] == "4500"
    assert sent["metadata[aza_purpose]"] == "ai_topup"
    assert sent["metadata[practice_id]"] == PRACTICE
    assert sent["metadata[subscription_id]"] == SUBSCRIPTION
    assert sent["metadata[paid_chf]"] == "45"
    assert Decimal(sent["metadata[internal_credit_usd]"]) == Decimal("15")
    assert sent["payment_intent_data[metadata][aza_purpose]"] == "ai_topup"
    assert sent["customer_email"] == "cli@example.test"
    assert await count(db, "SELECT COUNT(*) FROM ai_credit_ledger") == 0


async def test_topup_success_url_is_succes2(db: Database, stripe_api: respx.MockRouter) -> None:
    """The default top-up success URL is the seed's …/succes2, and it is not the setup URL."""
    svc = service(db, stripe=stripe_adapter())
    await svc.create_topup_checkout(
        PRACTICE,
        subscription_id=SUBSCRIPTION,
        customer_email=None,
        amount_chf=30,
        success_url=CreditConfig.defaults().topup_success_url,
        cancel_url="https://aza-medwork.ch",
    )
    assert form(stripe_api.calls.last.request)["success_url"] == "https://aza-medwork.ch/succes2"


async def test_abo_checkout_success_url_unchanged(
    db: Database, stripe_api: respx.MockRouter
) -> None:
    """Top-up and card setup use distinct success URLs (no subscription checkout exists here)."""
    svc = service(db, stripe=stripe_adapter())
    await svc.create_topup_checkout(
        PRACTICE, subscription_id=None, customer_email=None, amount_chf=30
    )
    await svc.create_setup_checkout(PRACTICE, customer_email=None)
    topup, setup = (form(call.request)["success_url"] for call in stripe_api.calls)
    assert topup == CreditConfig.defaults().topup_success_url
    assert setup == CreditConfig.defaults().setup_success_url
    assert topup != setup


async def test_setup_checkout_uses_setup_success_url(
    db: Database, stripe_api: respx.MockRouter
) -> None:
    """Card setup: mode setup, customer_creation always, the seed's setup success URL, metadata."""
    svc = service(db, stripe=stripe_adapter(), live_key=True, allow_live=True)
    r = await svc.create_setup_checkout(
        PRACTICE, customer_email="cli@example.test", cancel_url="https://aza-medwork.ch"
    )
    sent = form(stripe_api.calls.last.request)
    assert sent["mode"] == "setup"
    assert sent["customer_creation"] == "always"
    assert sent["success_url"] == "https://aza-medwork.ch/ki-topup-setup-success/"
    assert sent["currency"] == "chf"
    assert sent["metadata[aza_purpose]"] == "ai_topup_setup"
    assert sent["setup_intent_data[metadata][practice_id]"] == PRACTICE
    assert r["checkout_url"] == r["setup_url"] == r["url"] is not None


async def test_setup_url_field_aliases_accepted(db: Database, stripe_api: respx.MockRouter) -> None:
    """Every checkout answer carries checkout_url, setup_url and url with the same value."""
    svc = service(db, stripe=stripe_adapter())
    for r in (
        await svc.create_setup_checkout(PRACTICE, customer_email=None),
        await svc.create_topup_checkout(
            PRACTICE, subscription_id=None, customer_email=None, amount_chf=30
        ),
    ):
        assert (
            r["checkout_url"]
            == r["setup_url"]
            == r["url"]
            == "https://checkout.stripe.test/pay/cs_test_123"
        )


async def test_setup_reuses_saved_customer(db: Database, stripe_api: respx.MockRouter) -> None:
    """With a saved customer the setup session attaches to it instead of creating one."""
    await save(db, enabled=False, customer="cus_saved", payment_method=None)
    await service(db, stripe=stripe_adapter()).create_setup_checkout(PRACTICE, customer_email=None)
    sent = form(stripe_api.calls.last.request)
    assert sent["customer"] == "cus_saved" and "customer_creation" not in sent


async def test_no_live_topup_when_allow_live_off(
    db: Database, stripe_api: respx.MockRouter
) -> None:
    """A live key without AZA_AI_TOPUP_ALLOW_LIVE gives LIVE_TOPUP_BLOCKED, no Stripe call."""
    svc = service(db, stripe=stripe_adapter(), live_key=True, allow_live=False)
    for call in (
        svc.create_topup_checkout(
            PRACTICE, subscription_id=None, customer_email=None, amount_chf=30
        ),
        svc.create_setup_checkout(PRACTICE, customer_email=None),
    ):
        with pytest.raises(CreditError) as info:
            await call
        assert info.value.error_code == "LIVE_TOPUP_BLOCKED" and credit_status(info.value) == 403
    assert not stripe_api.calls


@pytest.mark.parametrize(
    "amount", ["nan", "-30", "0", "9.99", "1000.01", "1e12", "abc", float("inf"), True, "30.001"]
)
async def test_topup_amount_validated(db: Database, amount: object) -> None:
    """NaN, negative, zero, too small, too large, non-numeric and sub-Rappen amounts are 422s."""
    with pytest.raises(CreditError) as info:
        await service(db, dry_run=True).create_topup_checkout(
            PRACTICE,
            subscription_id=None,
            customer_email=None,
            amount_chf=amount,  # type: ignore[arg-type]
        )
    assert credit_status(info.value) == 422
    assert info.value.error_code == "INVALID_TOPUP_AMOUNT"
    assert info.value.param == "amount_chf"
    assert "CHF" in info.value.message_user


async def test_manual_topup_checkout_allowed_when_auto_limit_reached(db: Database) -> None:
    """Auto top-up stops at the monthly limit, a manual top-up checkout still works."""
    await save(db, trigger=50, limit="60")
    for i in range(2):
        await book(
            db,
            usd="10",
            chf="30",
            event_type=EventType.AUTO_TOPUP_PURCHASE,
            payment_intent_id=f"pi_auto_cap_{i}",
        )
    svc = service(db, dry_run=True)
    blocked = await svc.maybe_auto_topup(
        PRACTICE, available_percent=5, subscription_id=SUBSCRIPTION
    )
    assert blocked.reason == "auto_topup_monthly_limit_reached"
    manual = await svc.create_topup_checkout(
        PRACTICE, subscription_id=SUBSCRIPTION, customer_email=None, amount_chf=30
    )
    assert manual["dry_run"] is True and manual["ok"] is True


async def test_stripe_errors_become_credit_errors(db: Database) -> None:
    """Stripe 5xx → 503 STRIPE_UNAVAILABLE; no Stripe key → 503 STRIPE_NOT_CONFIGURED."""
    with respx.mock(base_url=STRIPE_BASE, assert_all_called=False) as router:
        router.post("/v1/checkout/sessions").mock(
            return_value=httpx.Response(
                500, json={"error": {"type": "api_error", "message": "boom"}}
            )
        )
        with pytest.raises(CreditError) as info:
            await service(db, stripe=stripe_adapter()).create_topup_checkout(
                PRACTICE, subscription_id=None, customer_email=None, amount_chf=30
            )
        assert (credit_status(info.value), info.value.error_code) == (503, "STRIPE_UNAVAILABLE")
    with pytest.raises(CreditError) as info:
        await service(db, stripe=None).create_topup_checkout(
            PRACTICE, subscription_id=None, customer_email=None, amount_chf=30
        )
    assert (credit_status(info.value), info.value.error_code) == (503, "STRIPE_NOT_CONFIGURED")
