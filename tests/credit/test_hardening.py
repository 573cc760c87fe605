"""Issue 12's credit holes: one payment credits once, refunds find it, Stripe's text stays out."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal
from typing import Any

import httpx
import pytest
import respx

from credit.checkout import TOPUP_REF_KEY
from credit.errors import CreditError
from credit.ports import Database
from credit.service import CreditService
from credit.stripe_port import checkout_params
from gateway.errors import credit_status

from .helpers import (
    CREDIT,
    PRACTICE,
    STRIPE_BASE,
    STRIPE_HTTPX_DEPRECATION,
    Clock,
    count,
    event,
    form,
    payment_intent_json,
    policy,
    service,
    sign,
    stripe_adapter,
    topup_meta,
)

pytestmark = pytest.mark.filterwarnings(STRIPE_HTTPX_DEPRECATION)

REF = "topup_0123456789abcdef0123456789abcdef"


def _meta() -> dict[str, str]:
    return {**topup_meta(), TOPUP_REF_KEY: REF}


async def deliver(svc: Any, body: bytes) -> dict[str, Any]:
    return await svc.handle_webhook(body, sign(body))


def _session(cs_id: str, payment_intent: str | None) -> dict[str, Any]:
    return {
        "id": cs_id,
        "object": "checkout.session",
        "mode": "payment",
        "payment_status": "paid",
        "payment_intent": payment_intent,
        "amount_total": 3000,
        "currency": "chf",
        "metadata": _meta(),
    }


def _charge(amount_refunded: int) -> dict[str, Any]:
    return {
        "id": "ch_ref",
        "object": "charge",
        "payment_intent": "pi_ref",
        "amount": 3000,
        "amount_refunded": amount_refunded,
        "refunds": {"object": "list", "data": [{"id": "re_1", "object": "refund"}]},
    }


@pytest.mark.parametrize("session_first", [True, False])
async def test_session_without_payment_intent_and_its_intent_credit_once(
    db: Database, session_first: bool
) -> None:
    """checkout.session.completed with payment_intent null and payment_intent.succeeded of the
    same top-up credit once, in either order; the later refund finds the purchase."""
    svc = service(db)
    bodies = [
        event("checkout.session.completed", _session("cs_nopi", None)),
        event("payment_intent.succeeded", payment_intent_json("pi_ref", metadata=_meta())),
    ]
    if not session_first:
        bodies.reverse()
    results = [await deliver(svc, body) for body in bodies]
    assert [r["credited"] for r in results] == [True, False]
    assert await svc.extra_credit_micros(PRACTICE) == 20_000_000
    async with db.read() as conn:
        rows = await conn.fetchall(
            "SELECT stripe_checkout_session_id, stripe_payment_intent_id FROM ai_credit_ledger"
        )
    assert [tuple(r) for r in rows] == [("cs_nopi", "pi_ref")]
    refund = await deliver(svc, event("charge.refunded", _charge(3000)))
    assert refund["handled"] is True
    assert await svc.extra_credit_micros(PRACTICE) == 0


async def test_refund_metadata_is_json() -> None:
    """A refund entry's meta_json holds its Stripe refund ids as a JSON list, not a repr."""
    from credit.ledger import clean_meta

    stored = json.dumps(clean_meta({"stripe_refunds": ["re_1", "pm_secret"], "n": (1, 2)}))
    assert json.loads(stored) == {"stripe_refunds": ["re_1"], "n": [1, 2]}


async def test_refund_entry_stores_refund_ids_as_a_list(db: Database) -> None:
    """Through the webhook: the refund's stored metadata parses to ["re_1"]."""
    svc = service(db)
    await deliver(
        svc, event("payment_intent.succeeded", payment_intent_json("pi_ref", metadata=_meta()))
    )
    await deliver(svc, event("charge.refunded", _charge(1000)))
    async with db.read() as conn:
        raw = await conn.fetchval(
            "SELECT meta_json FROM ai_credit_ledger WHERE event_type = 'refund'"
        )
    assert json.loads(raw)["stripe_refunds"] == ["re_1"]


def test_checkout_reference_goes_on_session_and_payment_intent() -> None:
    """The top-up reference is in the session's metadata and its PaymentIntent's alike."""
    from credit.stripe_port import CheckoutRequest

    params = checkout_params(
        CheckoutRequest(
            mode="payment",
            success_url="https://x.test/ok",
            cancel_url="https://x.test/no",
            metadata=_meta(),
            amount_rappen=3000,
        )
    )
    assert params["metadata"][TOPUP_REF_KEY] == REF
    assert params["payment_intent_data"]["metadata"][TOPUP_REF_KEY] == REF


async def test_created_checkouts_carry_a_fresh_reference(db: Database) -> None:
    """Each manual top-up checkout sends Stripe its own reference."""
    with respx.mock(base_url=STRIPE_BASE) as router:
        route = router.post("/v1/checkout/sessions").mock(
            return_value=httpx.Response(200, json={"id": "cs_1", "url": "https://c.test/1"})
        )
        svc = service(db, stripe=stripe_adapter())
        for _ in range(2):
            await svc.create_topup_checkout(
                PRACTICE, subscription_id=None, customer_email=None, amount_chf=30
            )
        refs = [form(call.request)[f"metadata[{TOPUP_REF_KEY}]"] for call in route.calls]
    assert len(set(refs)) == 2 and all(ref.startswith("topup_") for ref in refs)


@pytest.mark.parametrize("status", [400, 401, 500])
async def test_stripe_error_text_never_reaches_the_client(db: Database, status: int) -> None:
    """Stripe's message (which may quote a key) is not in the error; its request id is."""
    leaked = "Invalid API Key provided: sk_test_****************abcd"
    with respx.mock(base_url=STRIPE_BASE) as router:
        router.post("/v1/checkout/sessions").mock(
            return_value=httpx.Response(
                status,
                json={"error": {"type": "invalid_request_error", "message": leaked}},
                headers={"request-id": "req_stripe123"},
            )
        )
        with pytest.raises(CreditError) as caught:
            await service(db, stripe=stripe_adapter()).create_topup_checkout(
                PRACTICE, subscription_id=None, customer_email=None, amount_chf=30
            )
    error = caught.value
    assert credit_status(error) in (502, 503)
    for text in (error.message, error.message_user, str(error), repr(error)):
        assert "sk_" not in text and "Invalid API Key" not in text
    assert "req_stripe123" in error.message
    assert await count(db, "SELECT COUNT(*) FROM ai_credit_ledger") == 0


@pytest.mark.parametrize("status", [400, 500])
async def test_a_refused_vat_rate_keeps_stripe_text_from_the_client(
    db: Database, status: int
) -> None:
    """The VAT tax rate Stripe refuses is reported like a refused session: no Stripe text."""
    leaked = "Invalid API Key provided: sk_test_****************abcd"
    config = replace(CREDIT, vat_rate=Decimal("8.1"))
    svc = CreditService(
        db, stripe=stripe_adapter(), policy=replace(policy(), config=config), clock=Clock()
    )
    with respx.mock(base_url=STRIPE_BASE, assert_all_called=False) as router:
        router.post("/v1/tax_rates").mock(
            return_value=httpx.Response(
                status,
                json={"error": {"type": "invalid_request_error", "message": leaked}},
                headers={"request-id": "req_tax123"},
            )
        )
        sessions = router.post("/v1/checkout/sessions")
        with pytest.raises(CreditError) as caught:
            await svc.create_topup_checkout(
                PRACTICE, subscription_id=None, customer_email=None, amount_chf=30
            )
    error = caught.value
    assert credit_status(error) == (502 if status == 400 else 503)
    for text in (error.message, error.message_user, str(error), repr(error)):
        assert "sk_" not in text and "Invalid API Key" not in text
    assert "req_tax123" in error.message and not sessions.called
    assert await count(db, "SELECT COUNT(*) FROM ai_credit_ledger") == 0


async def test_signed_body_that_is_not_json_is_a_400(db: Database) -> None:
    """A correctly signed body that is not JSON (or nested too deep) is refused with 400."""
    svc = service(db)
    for body in (b"not json at all", b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(CreditError) as caught:
            await deliver(svc, body)
        assert (credit_status(caught.value), caught.value.error_code) == (
            400,
            "INVALID_WEBHOOK_PAYLOAD",
        )
    assert await count(db, "SELECT COUNT(*) FROM stripe_webhook_events") == 0


async def test_refund_of_a_purchase_booked_from_its_session_alone(db: Database) -> None:
    """Session (payment_intent null) credited, its PaymentIntent event never came: the refund
    finds the purchase by the reference on the PaymentIntent Stripe returns, books once."""
    with respx.mock(base_url=STRIPE_BASE) as router:
        router.get("/v1/payment_intents/pi_ref").mock(
            return_value=httpx.Response(200, json=payment_intent_json("pi_ref", metadata=_meta()))
        )
        svc = service(db, stripe=stripe_adapter())
        await deliver(svc, event("checkout.session.completed", _session("cs_only", None)))
        refund = await deliver(svc, event("charge.refunded", _charge(1500)))
        assert refund["handled"] is True
        replay = await deliver(svc, event("charge.refunded", _charge(1500)))
        assert replay["result"]["duplicate"] is True
    assert await svc.extra_credit_micros(PRACTICE) == 10_000_000
    async with db.read() as conn:
        pi = await conn.fetchval(
            "SELECT stripe_payment_intent_id FROM ai_credit_ledger "
            "WHERE event_type = 'topup_purchase'"
        )
    assert pi == "pi_ref"


async def test_a_refund_delivered_before_its_purchase_is_retried_not_lost(db: Database) -> None:
    """Stripe does not order deliveries: a refund of a top-up whose own event has not come yet
    is refused (409, nothing written) so Stripe redelivers it; after the purchase it books."""
    with respx.mock(base_url=STRIPE_BASE) as router:
        router.get("/v1/payment_intents/pi_ref").mock(
            return_value=httpx.Response(200, json=payment_intent_json("pi_ref", metadata=_meta()))
        )
        svc = service(db, stripe=stripe_adapter())
        with pytest.raises(CreditError) as caught:
            await deliver(svc, event("charge.refunded", _charge(1500), event_id="evt_refund"))
        assert (credit_status(caught.value), caught.value.error_code) == (
            409,
            "REFUND_BEFORE_PURCHASE",
        )
        assert await count(db, "SELECT COUNT(*) FROM ai_credit_ledger") == 0
        assert await count(db, "SELECT COUNT(*) FROM stripe_webhook_events") == 0
        await deliver(svc, event("checkout.session.completed", _session("cs_late", None)))
        again = await deliver(svc, event("charge.refunded", _charge(1500), event_id="evt_refund"))
        assert again["handled"] is True and again["credited"] is False
    assert await svc.extra_credit_micros(PRACTICE) == 10_000_000
