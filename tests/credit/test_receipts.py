"""Receipts and VAT: what Stripe is asked for, and the URL the ledger keeps.

Stripe is the demo's stand-in (gateway/demo/stripe_standin.py) on a loopback
port, reached by the real stripe-python adapter; the webhook is signed like
Stripe signs it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from credit.checkout import vat_footer
from credit.config import CreditConfig
from credit.service import CreditPolicy, CreditService
from credit.stripe_port import StripeClientAdapter
from gateway.demo.stripe_standin import StripeStandIn, stripe_signature
from gateway.storage import AnyDatabase
from tests.credit.helpers import (
    PRACTICE,
    SUBSCRIPTION,
    WEBHOOK_SECRET,
    Clock,
    add_license,
    save,
)
from tests.integration.conftest import serve

# The shipped config without VAT (what these tests start from; each sets its own rate).
NO_VAT = replace(CreditConfig.defaults(), vat_rate=Decimal("0"))


@pytest.fixture
async def stand_in() -> AsyncIterator[StripeStandIn]:
    stripe = StripeStandIn(webhook_secret=WEBHOOK_SECRET)
    async with serve(stripe.app) as root:
        stripe.base_url = root
        yield stripe


@pytest.fixture
async def adapter(stand_in: StripeStandIn) -> AsyncIterator[StripeClientAdapter]:
    client = StripeClientAdapter(
        "sk_test_receipts", api_base=stand_in.base_url, timeout_seconds=5, max_network_retries=0
    )
    yield client
    await client.aclose()


def credit_service(db: AnyDatabase, adapter: StripeClientAdapter, **config: Any) -> CreditService:
    policy = CreditPolicy(
        auto_topup_enabled=True,
        dry_run=False,
        allow_live=False,
        live_key=False,
        webhook_secret=WEBHOOK_SECRET,
        config=replace(NO_VAT, **config),
    )
    return CreditService(db, stripe=adapter, policy=policy, clock=Clock())


async def ledger(db: AnyDatabase) -> list[Any]:
    async with db.read() as conn:
        return list(
            await conn.fetchall(
                "SELECT event_type, status, receipt_url, amount_paid_rappen "
                "FROM ai_credit_ledger WHERE practice_id = ? ORDER BY id",
                PRACTICE,
            )
        )


def test_the_invoice_footer_states_the_vat_included() -> None:
    """8.1 % included in 30 CHF is 2.25 CHF (30 x 8.1 / 108.1, to the Rappen)."""
    config = replace(NO_VAT, vat_rate=Decimal("8.1"))
    assert vat_footer(Decimal("30"), config) == (
        "Im Betrag von CHF 30.00 enthalten: 8.1 % MWST, CHF 2.25."
    )
    assert vat_footer(Decimal("30"), NO_VAT) is None
    assert vat_footer(Decimal("30"), replace(config, stripe_tax=True)) is None


async def test_a_checkout_top_up_gets_an_invoice_with_vat_and_the_ledger_keeps_its_url(
    db: AnyDatabase, stand_in: StripeStandIn, adapter: StripeClientAdapter
) -> None:
    """invoice_creation, one inclusive CH tax rate on the line; after the webhook, the URL."""
    await add_license(db)
    credit = credit_service(db, adapter, vat_rate=Decimal("8.1"))
    first = await credit.create_topup_checkout(
        PRACTICE, subscription_id=SUBSCRIPTION, customer_email="a@b.ch", amount_chf="30"
    )
    await credit.create_topup_checkout(
        PRACTICE, subscription_id=SUBSCRIPTION, customer_email="a@b.ch", amount_chf="50"
    )
    [rate] = stand_in.tax_rates.values()  # made once, then reused
    assert (rate["percentage"], rate["inclusive"], rate["country"]) == (8.1, True, "CH")
    session = stand_in.sessions[first["session_id"]]
    assert session["_line_items"][0]["tax_rates"] == [rate["id"]]
    assert session["_invoice_creation"]["enabled"] == "true"
    assert "8.1 % MWST, CHF 2.25" in session["_invoice_creation"]["invoice_data"]["footer"]

    stand_in._complete(session)
    body = json.dumps(
        {
            "id": "evt_receipt_1",
            "object": "event",
            "type": "checkout.session.completed",
            "created": 1,
            "data": {"object": {k: v for k, v in session.items() if not k.startswith("_")}},
        }
    ).encode()
    answer = await credit.handle_webhook(body, stripe_signature(body, WEBHOOK_SECRET))
    assert answer["credited"]
    [entry] = await ledger(db)
    invoice = stand_in.invoices[session["invoice"]]
    assert entry["receipt_url"] == invoice["hosted_invoice_url"]
    [item] = await credit.history(PRACTICE)
    assert item["receipt_url"] == invoice["hosted_invoice_url"]


async def test_stripe_tax_replaces_the_configured_rate(
    db: AnyDatabase, stand_in: StripeStandIn, adapter: StripeClientAdapter
) -> None:
    await add_license(db)
    credit = credit_service(db, adapter, vat_rate=Decimal("8.1"), stripe_tax=True)
    made = await credit.create_topup_checkout(
        PRACTICE, subscription_id=SUBSCRIPTION, customer_email=None, amount_chf="30"
    )
    assert not stand_in.tax_rates
    [item] = stand_in.sessions[made["session_id"]]["_line_items"]
    assert "tax_rates" not in item
    # The 30 CHF are paid VAT included: Stripe Tax must not add VAT on top.
    assert item["price_data"]["tax_behavior"] == "inclusive"


async def test_an_automatic_top_up_e_mails_a_receipt_and_keeps_its_url(
    db: AnyDatabase, stand_in: StripeStandIn, adapter: StripeClientAdapter
) -> None:
    """The PaymentIntent carries receipt_email (the license's); the charge's receipt is kept."""
    await add_license(db)
    await save(db, trigger=50)
    credit = credit_service(db, adapter)
    outcome = await credit.maybe_auto_topup(
        PRACTICE, available_percent=5, subscription_id=SUBSCRIPTION
    )
    assert outcome.charged
    [intent] = stand_in.payment_intents.values()
    assert intent["receipt_email"] == "cli@example.test"
    charge = stand_in.charges[intent["latest_charge"]]
    [entry] = await ledger(db)
    assert (entry["event_type"], entry["status"]) == ("auto_topup_purchase", "succeeded")
    assert entry["receipt_url"] == charge["receipt_url"]


async def test_a_receipt_that_cannot_be_found_leaves_the_credit_standing(
    db: AnyDatabase, stand_in: StripeStandIn, adapter: StripeClientAdapter
) -> None:
    """A charge Stripe does not know: the top-up is credited, without a link."""
    await add_license(db)
    await save(db, trigger=50)
    credit = credit_service(db, adapter)
    original = stand_in._charge

    def forgetful(intent: dict[str, Any], email: str | None) -> dict[str, Any]:
        charge = original(intent, email)
        del stand_in.charges[charge["id"]]
        return charge

    stand_in._charge = forgetful  # type: ignore[method-assign]
    outcome = await credit.maybe_auto_topup(
        PRACTICE, available_percent=5, subscription_id=SUBSCRIPTION
    )
    assert outcome.charged
    [entry] = await ledger(db)
    assert entry["status"] == "succeeded" and entry["receipt_url"] is None
