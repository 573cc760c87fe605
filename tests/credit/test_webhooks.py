"""Stripe webhooks with real signatures through CreditService.handle_webhook (both engines)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import respx

from credit import card_setup, subscriptions
from credit.config import CreditConfig
from credit.errors import CreditError, WebhookSignatureError
from credit.ledger import EventType, Status
from credit.ports import Connection, Database, Row
from credit.stripe_events import parse_event
from credit.topup_settings import load_settings
from credit.webhook_handling import Delivery
from gateway.errors import credit_status

from .helpers import (
    PRACTICE,
    STRIPE_BASE,
    STRIPE_HTTPX_DEPRECATION,
    SUBSCRIPTION,
    add_license,
    book,
    count,
    event,
    payment_intent_json,
    save,
    service,
    sign,
    stripe_adapter,
    topup_meta,
)

pytestmark = pytest.mark.filterwarnings(STRIPE_HTTPX_DEPRECATION)

LEDGER = "SELECT COUNT(*) FROM ai_credit_ledger"
EVENTS = "SELECT COUNT(*) FROM stripe_webhook_events"


async def deliver(svc: Any, body: bytes) -> dict[str, Any]:
    return await svc.handle_webhook(body, sign(body))


def session(cs_id: str = "cs_test_001", *, paid: bool = True, **extra: Any) -> dict[str, Any]:
    obj = {
        "id": cs_id,
        "object": "checkout.session",
        "mode": "payment",
        "payment_status": "paid" if paid else "unpaid",
        "metadata": topup_meta(),
        **extra,
    }
    return obj


def topup_intent(pi_id: str, **extra: Any) -> dict[str, Any]:
    return {**payment_intent_json(pi_id, metadata=topup_meta()), **extra}


async def _settings(db: Database) -> Any:
    async with db.read() as conn:
        return await load_settings(conn, PRACTICE, CreditConfig.defaults())


# -- signatures ---------------------------------------------------------------------


async def test_bad_or_missing_signature_writes_nothing(db: Database) -> None:
    """Missing, wrong-secret, tampered and stale signatures raise; nothing is written."""
    svc = service(db)
    body = event("checkout.session.completed", session())
    stale = sign(body, timestamp=int(time.time()) - 600)
    for header in (None, "", "garbage", sign(body, "whsec_other"), stale):
        with pytest.raises(WebhookSignatureError) as info:
            await svc.handle_webhook(body, header)
        assert credit_status(info.value) == 400
    with pytest.raises(WebhookSignatureError):
        await svc.handle_webhook(body.replace(b'"30"', b'"3000"'), sign(body))
    assert await count(db, LEDGER) == 0 and await count(db, EVENTS) == 0


async def test_webhook_secret_not_configured(db: Database) -> None:
    """Without STRIPE_WEBHOOK_SECRET deliveries are refused (503), not trusted."""
    body = event("checkout.session.completed", session())
    with pytest.raises(CreditError) as info:
        await service(db, secret=None).handle_webhook(body, sign(body))
    assert credit_status(info.value) == 503
    assert info.value.error_code == "STRIPE_WEBHOOK_NOT_CONFIGURED"


# -- manual top-ups ----------------------------------------------------------------------


async def test_webhook_writes_single_credit(db: Database) -> None:
    """A paid session credits once; a second event for it and a replay are duplicates."""
    svc = service(db)
    first = event("checkout.session.completed", session(), event_id="evt_1")
    r1 = await deliver(svc, first)
    r2 = await deliver(svc, event("checkout.session.completed", session(), event_id="evt_2"))
    r3 = await deliver(svc, first)
    assert r1["credited"] is True and r1["duplicate"] is False
    assert r2["result"]["duplicate"] is True and r2["credited"] is False
    assert r3["duplicate"] is True
    assert (
        await count(
            db,
            "SELECT COUNT(*) FROM ai_credit_ledger "
            "WHERE stripe_checkout_session_id = 'cs_test_001'",
        )
        == 1
    )
    assert await svc.extra_credit_micros(PRACTICE) == 20_000_000
    assert await count(db, EVENTS) == 2


async def test_failed_payment_no_credit(db: Database) -> None:
    """An unpaid session is recorded as failed with amount 0 and credits nothing."""
    svc = service(db)
    r = await deliver(svc, event("checkout.session.completed", session("cs_test_fail", paid=False)))
    assert r["credited"] is False
    async with db.read() as conn:
        row = await conn.fetchone(
            "SELECT status, amount_internal_micro_usd FROM ai_credit_ledger "
            "WHERE stripe_checkout_session_id = 'cs_test_fail'"
        )
    assert row is not None and (row[0], row[1]) == ("failed", 0)
    assert await svc.extra_credit_micros(PRACTICE) == 0


async def test_amount_mismatch_is_not_credited(db: Database) -> None:
    """amount_total (Rappen) not matching metadata paid_chf → failed with a reason, no credit."""
    svc = service(db)
    r = await deliver(svc, event("checkout.session.completed", session(amount_total=2000)))
    assert r["credited"] is False and r["result"]["reason"] == "amount_mismatch"
    r = await deliver(
        svc,
        event(
            "payment_intent.succeeded", topup_intent("pi_short", amount=100, amount_received=100)
        ),
    )
    assert r["credited"] is False and r["result"]["reason"] == "amount_mismatch"
    assert await svc.extra_credit_micros(PRACTICE) == 0
    history = await svc.history(PRACTICE)
    assert {i["failure_reason"] for i in history} == {"amount_mismatch"}


async def test_double_payment_intent_no_double_credit(db: Database) -> None:
    """payment_intent.succeeded for a manual top-up credits once."""
    svc = service(db)
    r1 = await deliver(svc, event("payment_intent.succeeded", topup_intent("pi_manual_1")))
    r2 = await deliver(svc, event("payment_intent.succeeded", topup_intent("pi_manual_1")))
    assert r1["credited"] and r2["result"]["duplicate"]
    assert (
        await count(
            db,
            "SELECT COUNT(*) FROM ai_credit_ledger WHERE stripe_payment_intent_id = 'pi_manual_1'",
        )
        == 1
    )


@pytest.mark.parametrize("session_first", [True, False])
async def test_session_and_intent_credit_once_in_either_order(
    db: Database, session_first: bool
) -> None:
    """checkout.session.completed and payment_intent.succeeded of one payment credit once."""
    svc = service(db)
    bodies = [
        event(
            "checkout.session.completed",
            session("cs_pair", payment_intent="pi_pair", amount_total=3000),
        ),
        event("payment_intent.succeeded", topup_intent("pi_pair")),
    ]
    if not session_first:
        bodies.reverse()
    results = [await deliver(svc, body) for body in bodies]
    assert [r["credited"] for r in results] == [True, False]
    assert results[1]["result"]["duplicate"] is True
    async with db.read() as conn:
        rows = await conn.fetchall(
            "SELECT stripe_checkout_session_id, stripe_payment_intent_id FROM ai_credit_ledger"
        )
    assert [tuple(r) for r in rows] == [("cs_pair", "pi_pair")]
    assert await svc.extra_credit_micros(PRACTICE) == 20_000_000


async def test_concurrent_duplicate_deliveries_credit_once(db: Database) -> None:
    """Five simultaneous deliveries of one event, plus its PaymentIntent event: one credit."""
    svc = service(db)
    body = event("checkout.session.completed", session("cs_conc", payment_intent="pi_conc"))
    other = event("payment_intent.succeeded", topup_intent("pi_conc"))
    results = await asyncio.gather(*(deliver(svc, body) for _ in range(5)), deliver(svc, other))
    assert sum(1 for r in results if r.get("credited")) == 1
    assert sum(1 for r in results if r["duplicate"]) == 4
    assert await count(db, LEDGER) == 1
    assert await svc.extra_credit_micros(PRACTICE) == 20_000_000


async def test_async_payment_succeeded_and_failed(db: Database) -> None:
    """Delayed payment methods: async success credits, async failure records a failed attempt."""
    svc = service(db)
    await deliver(svc, event("checkout.session.completed", session("cs_async", paid=False)))
    r = await deliver(svc, event("checkout.session.async_payment_succeeded", session("cs_async")))
    assert r["credited"] is True
    r = await deliver(
        svc, event("checkout.session.async_payment_failed", session("cs_async_no", paid=False))
    )
    assert r["credited"] is False and r["result"]["reason"] == "async_payment_failed"
    assert await svc.extra_credit_micros(PRACTICE) == 20_000_000


async def test_unknown_event_acknowledged_and_ignored(db: Database) -> None:
    """An event type we do not handle is acknowledged (and recorded), nothing else written."""
    r = await deliver(service(db), event("invoice.paid", {"id": "in_1", "object": "invoice"}))
    assert r == {**r, "received": True, "handled": False, "duplicate": False}
    assert await count(db, LEDGER) == 0 and await count(db, EVENTS) == 1


class _FailingConnection:
    def __init__(self, inner: Connection) -> None:
        self._inner = inner

    async def execute(self, sql: str, *args: Any) -> int:
        return await self._inner.execute(sql, *args)

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        if sql.lstrip().startswith("INSERT INTO ai_credit_ledger"):
            raise RuntimeError("disk on fire")
        return await self._inner.fetchone(sql, *args)

    async def fetchall(self, sql: str, *args: Any) -> Sequence[Row]:
        return await self._inner.fetchall(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        if sql.lstrip().startswith("INSERT INTO ai_credit_ledger"):
            raise RuntimeError("disk on fire")
        return await self._inner.fetchval(sql, *args)


class _FailingDatabase:
    """The real database, except that writing a ledger row fails (a handler failure)."""

    def __init__(self, inner: Database) -> None:
        self._inner = inner
        self.dialect = inner.dialect

    @asynccontextmanager
    async def transaction(self, *, lock: str | None = None) -> AsyncIterator[Connection]:
        async with self._inner.transaction(lock=lock) as conn:
            yield _FailingConnection(conn)

    def read(self) -> Any:
        return self._inner.read()


async def test_handler_failure_rolls_back_event_id(db: Database) -> None:
    """A failing handler propagates, records no event id, and Stripe's retry then credits once."""
    body = event("checkout.session.completed", session("cs_retry"), event_id="evt_retry")
    with pytest.raises(RuntimeError):
        await deliver(service(_FailingDatabase(db)), body)  # type: ignore[arg-type]
    assert await count(db, EVENTS) == 0 and await count(db, LEDGER) == 0
    r = await deliver(service(db), body)
    assert r["credited"] is True and r["duplicate"] is False


# -- refunds -------------------------------------------------------------------------------


def charge(
    amount_refunded: int, *, pi_id: str = "pi_paid", refunds: Sequence[str] = ()
) -> dict[str, Any]:
    return {
        "id": "ch_paid",
        "object": "charge",
        "payment_intent": pi_id,
        "amount": 3000,
        "amount_refunded": amount_refunded,
        "refunded": amount_refunded >= 3000,
        "refunds": {"object": "list", "data": [{"id": r, "object": "refund"} for r in refunds]},
    }


async def test_refund_partial_then_full(db: Database) -> None:
    """Partial refund books its share; a replay books nothing; the rest books the remainder."""
    svc = service(db)
    await deliver(svc, event("payment_intent.succeeded", topup_intent("pi_paid")))
    r = await deliver(svc, event("charge.refunded", charge(1000, refunds=["re_1"])))
    assert r["handled"] is True
    assert await svc.extra_credit_micros(PRACTICE) == 20_000_000 - 6_666_667
    replay = await deliver(svc, event("charge.refunded", charge(1000, refunds=["re_1"])))
    assert replay["result"]["duplicate"] is True
    await deliver(svc, event("charge.refunded", charge(3000, refunds=["re_2", "re_1"])))
    assert await svc.extra_credit_micros(PRACTICE) == 0
    history = await svc.history(PRACTICE)
    refunds = [i for i in history if i["event_type"] == "refund"]
    assert sorted(i["amount_paid_rappen"] for i in refunds) == [-2000, -1000]
    assert sum(i["amount_internal_micro_usd"] for i in refunds) == -20_000_000


async def test_refund_uses_original_rate(db: Database) -> None:
    """A refund converts at the original entry's rate (6.6667 USD for 10 CHF), not today's."""
    await book(db, usd="6.6667", chf="10", payment_intent_id="pi_paid")
    svc = service(db)
    await deliver(svc, event("charge.refunded", {**charge(500), "amount": 1000}))
    history = await svc.history(PRACTICE)
    refund = next(i for i in history if i["event_type"] == "refund")
    assert refund["amount_internal_micro_usd"] == -3_333_350
    assert refund["amount_paid_chf"] == -5.0


async def test_refund_of_unknown_charge_ignored(db: Database) -> None:
    """A refund for a payment that never credited anything writes nothing."""
    r = await deliver(service(db), event("charge.refunded", charge(1000, pi_id="pi_unknown")))
    assert r["handled"] is False
    assert await count(db, LEDGER) == 0


# -- automatic top-ups ------------------------------------------------------------------------


def auto_intent(pi_id: str, *, ledger_id: int | None = None, **extra: Any) -> dict[str, Any]:
    meta = topup_meta(purpose="ai_auto_topup")
    if ledger_id is not None:
        meta["aza_ledger_id"] = str(ledger_id)
    return {**payment_intent_json(pi_id, metadata=meta), **extra}


async def test_auto_pi_webhook_idempotent(db: Database) -> None:
    """An auto top-up PaymentIntent without a pending entry credits once."""
    svc = service(db)
    r1 = await deliver(svc, event("payment_intent.succeeded", auto_intent("pi_auto_wh")))
    r2 = await deliver(svc, event("payment_intent.succeeded", auto_intent("pi_auto_wh")))
    assert r1["credited"] is True and r2["result"]["duplicate"] is True
    assert await count(db, LEDGER) == 1


async def test_auto_topup_webhook_after_charge_is_duplicate(db: Database) -> None:
    """The payment_intent.succeeded of a settled auto top-up does not credit again."""
    await save(db)
    with respx.mock(base_url=STRIPE_BASE, assert_all_called=False) as router:
        router.post("/v1/payment_intents").mock(
            return_value=httpx.Response(200, json=payment_intent_json("pi_auto_ok"))
        )
        svc = service(db, stripe=stripe_adapter())
        outcome = await svc.maybe_auto_topup(PRACTICE, available_percent=1, subscription_id=None)
    assert outcome.charged
    r = await deliver(
        svc,
        event(
            "payment_intent.succeeded",
            auto_intent("pi_auto_ok", ledger_id=outcome.ledger_id, amount=3000),
        ),
    )
    assert r["credited"] is False and r["result"]["duplicate"] is True
    assert await svc.extra_credit_micros(PRACTICE) == 10_000_000


async def test_auto_topup_webhook_before_settlement_settles_pending(db: Database) -> None:
    """A webhook arriving while the entry is pending settles that entry (one credit in total)."""
    ledger_id = await book(
        db, event_type=EventType.AUTO_TOPUP_PURCHASE, status=Status.PENDING, usd="10"
    )
    svc = service(db)
    r = await deliver(
        svc, event("payment_intent.succeeded", auto_intent("pi_early", ledger_id=ledger_id))
    )
    assert r["credited"] is True and r["result"]["ledger_id"] == ledger_id
    assert await count(db, LEDGER) == 1
    assert await svc.extra_credit_micros(PRACTICE) == 10_000_000


async def test_auto_topup_payment_failed_webhook_pauses(db: Database) -> None:
    """payment_intent.payment_failed fails the pending entry and pauses, keeping the card."""
    await save(db)
    ledger_id = await book(
        db, event_type=EventType.AUTO_TOPUP_PURCHASE, status=Status.PENDING, usd="10"
    )
    failed = auto_intent(
        "pi_bad",
        ledger_id=ledger_id,
        status="requires_payment_method",
        last_payment_error={"code": "card_declined", "decline_code": "expired_card"},
    )
    r = await deliver(service(db), event("payment_intent.payment_failed", failed))
    assert r["result"]["reason"] == "payment_failed"
    assert (
        await count(
            db, "SELECT COUNT(*) FROM ai_credit_ledger WHERE event_type = 'failed_auto_topup'"
        )
        == 1
    )
    settings = await _settings(db)
    assert settings.auto_topup_enabled is False and settings.default_payment_method_id == "pm_test"
    assert settings.paused_reason == "AUTO_TOPUP_PAYMENT_FAILED"


# -- card setup -----------------------------------------------------------------------------


def setup_session(cs_id: str, customer: Any, setup_intent: Any) -> dict[str, Any]:
    return {
        "id": cs_id,
        "object": "checkout.session",
        "mode": "setup",
        "customer": customer,
        "setup_intent": setup_intent,
        "metadata": {"aza_purpose": "ai_topup_setup", "practice_id": PRACTICE},
    }


async def test_setup_webhook_enables_auto_with_defaults(db: Database) -> None:
    """A completed setup saves customer and card and enables auto top-up with the defaults."""
    body = event(
        "checkout.session.completed",
        setup_session(
            "cs_setup_1", "cus_setup", {"id": "seti_setup_1", "payment_method": "pm_setup_1"}
        ),
    )
    r = await deliver(service(db), body)
    assert r["handled"] is True and r["result"]["auto_topup_enabled"] is True
    loaded = await _settings(db)
    assert loaded.auto_topup_enabled is True
    assert loaded.stripe_customer_id == "cus_setup"
    assert loaded.default_payment_method_id == "pm_setup_1"
    assert (loaded.topup_amount_chf, loaded.internal_credit_usd) == (30, 10)
    assert (loaded.trigger_below_percent, loaded.monthly_limit_chf) == (5, 300)
    assert await count(db, LEDGER) == 0


async def test_setup_intent_succeeded_saves_payment_method(db: Database) -> None:
    """setup_intent.succeeded with our metadata saves customer and card and enables auto top-up."""
    intent = {
        "id": "seti_test_1",
        "object": "setup_intent",
        "customer": "cus_setup2",
        "payment_method": "pm_setup_test",
        "metadata": {"aza_purpose": "ai_topup_setup", "practice_id": PRACTICE},
    }
    r = await deliver(service(db), event("setup_intent.succeeded", intent))
    assert r["handled"] is True
    loaded = await _settings(db)
    assert loaded.auto_topup_enabled is True
    assert (loaded.stripe_customer_id, loaded.default_payment_method_id) == (
        "cus_setup2",
        "pm_setup_test",
    )


async def test_setup_checkout_with_embedded_setup_intent_pm(db: Database) -> None:
    """An expanded payment method object inside the SetupIntent is reduced to its id."""
    body = event(
        "checkout.session.completed",
        setup_session(
            "cs_setup_2",
            "cus_setup3",
            {"id": "seti_embedded", "payment_method": {"id": "pm_embedded"}},
        ),
    )
    await deliver(service(db), body)
    loaded = await _settings(db)
    assert (loaded.stripe_customer_id, loaded.default_payment_method_id) == (
        "cus_setup3",
        "pm_embedded",
    )
    assert loaded.auto_topup_enabled is True


async def test_setup_stripe_object_pm_normalized_not_json(db: Database) -> None:
    """A Stripe object (or its JSON text) as payment method is stored as the bare id."""

    class _FakePm:
        id = "pm_stripe_obj"

    async with db.transaction(lock=PRACTICE) as conn:
        session = setup_session(
            "cs_setup_obj", "cus_obj", {"id": "seti_obj", "payment_method": _FakePm()}
        )
        r = await card_setup.checkout_completed(
            conn,
            Delivery(
                event=parse_event("evt_obj", "checkout.session.completed", None, session),
                now=int(time.time()),
                config=CreditConfig.defaults(),
            ),
        )
    assert r.auto_topup_enabled is True
    assert (await _settings(db)).default_payment_method_id == "pm_stripe_obj"
    as_json = json.dumps({"id": "pm_json_obj", "object": "payment_method"})
    await deliver(
        service(db),
        event(
            "checkout.session.completed",
            setup_session("cs_setup_js", "cus_obj", {"id": "seti_js", "payment_method": as_json}),
        ),
    )
    stored = (await _settings(db)).default_payment_method_id
    assert stored == "pm_json_obj" and not stored.startswith("{")


async def test_setup_bare_setup_intent_id_is_retrieved(db: Database) -> None:
    """A bare SetupIntent id is retrieved from Stripe (before the transaction) for its card."""
    with respx.mock(base_url=STRIPE_BASE, assert_all_called=False) as router:
        get = router.get("/v1/setup_intents/seti_bare").mock(
            return_value=httpx.Response(
                200,
                json={
                    "id": "seti_bare",
                    "object": "setup_intent",
                    "status": "succeeded",
                    "customer": "cus_bare",
                    "payment_method": "pm_bare",
                    "metadata": {},
                },
            )
        )
        svc = service(db, stripe=stripe_adapter())
        await deliver(
            svc,
            event("checkout.session.completed", setup_session("cs_bare", "cus_bare", "seti_bare")),
        )
    assert get.call_count == 1
    loaded = await _settings(db)
    assert (loaded.default_payment_method_id, loaded.auto_topup_enabled) == ("pm_bare", True)


async def test_setup_incomplete_without_customer(db: Database) -> None:
    """No customer: AUTO_TOPUP_SETUP_INCOMPLETE, auto stays off, the card is kept."""
    body = event(
        "checkout.session.completed",
        setup_session("cs_setup_nc", None, {"id": "seti_x", "payment_method": "pm_only"}),
    )
    r = await deliver(service(db), body)
    assert r["result"]["reason"] == "AUTO_TOPUP_SETUP_INCOMPLETE"
    loaded = await _settings(db)
    assert loaded.auto_topup_enabled is False
    assert loaded.default_payment_method_id == "pm_only"
    assert loaded.stripe_customer_id is None


async def test_setup_incomplete_without_payment_method(db: Database) -> None:
    """No payment method: AUTO_TOPUP_SETUP_INCOMPLETE, auto off, the customer is kept."""
    r = await deliver(
        service(db),
        event("checkout.session.completed", setup_session("cs_setup_np", "cus_only", None)),
    )
    assert r["result"]["reason"] == "AUTO_TOPUP_SETUP_INCOMPLETE"
    loaded = await _settings(db)
    assert loaded.auto_topup_enabled is False
    assert loaded.stripe_customer_id == "cus_only"


async def test_incomplete_setup_keeps_existing_card(db: Database) -> None:
    """An incomplete setup never replaces a complete earlier one."""
    await save(db, customer="cus_keep", payment_method="pm_keep")
    await deliver(
        service(db),
        event(
            "checkout.session.completed",
            setup_session("cs_half", None, {"id": "seti_h", "payment_method": "pm_new"}),
        ),
    )
    loaded = await _settings(db)
    assert (loaded.stripe_customer_id, loaded.default_payment_method_id) == ("cus_keep", "pm_keep")
    assert loaded.auto_topup_enabled is True


# -- subscriptions --------------------------------------------------------------------------


def subscription(
    status: str,
    *,
    lookup_key: str = "aza_basic_monthly",
    metadata: dict[str, str] | None = None,
    sub_id: str = "sub_new",
    period_start: int = 1_760_000_000,
    period_end: int = 1_762_592_000,
) -> dict[str, Any]:
    return {
        "id": sub_id,
        "object": "subscription",
        "customer": "cus_new",
        "status": status,
        "metadata": metadata or {},
        "items": {
            "object": "list",
            "data": [
                {
                    "id": "si_1",
                    "price": {"id": "price_1", "lookup_key": lookup_key},
                    "current_period_start": period_start,
                    "current_period_end": period_end,
                }
            ],
        },
    }


async def test_subscription_events_sync_licenses(db: Database) -> None:
    """created/updated/deleted keep status, plan and period of the license in sync."""
    svc = service(db)
    await deliver(
        svc,
        event(
            "customer.subscription.created",
            subscription("active", metadata={"practice_id": "prac_sub"}),
        ),
    )
    await deliver(
        svc,
        event(
            "customer.subscription.updated", subscription("past_due", lookup_key="aza_pro_monthly")
        ),
    )
    async with db.read() as conn:
        row = await conn.fetchone(
            "SELECT practice_id, status, lookup_key, current_period_start, current_period_end, "
            "customer_id FROM licenses WHERE subscription_id = 'sub_new'"
        )
    assert row is not None
    assert tuple(row) == (
        "prac_sub",
        "past_due",
        "aza_pro_monthly",
        1_760_000_000,
        1_762_592_000,
        "cus_new",
    )
    await deliver(svc, event("customer.subscription.deleted", subscription("canceled")))
    async with db.read() as conn:
        assert (
            await conn.fetchval("SELECT status FROM licenses WHERE subscription_id = 'sub_new'")
            == "canceled"
        )


async def test_subscription_for_unknown_practice_ignored(db: Database) -> None:
    """A subscription neither in metadata nor in licenses is acknowledged but not stored."""
    r = await deliver(service(db), event("customer.subscription.updated", subscription("active")))
    assert r["handled"] is False
    assert await count(db, "SELECT COUNT(*) FROM licenses") == 0


# Stripe delivers events out of order and retries old ones: the newest event's state stays.

T = 1_760_000_000  # an event's `created` (Unix seconds)
MONTH = 2_592_000
PRAC_SUB = {"practice_id": "prac_sub"}


async def license_state(db: Database, sub_id: str = "sub_new") -> tuple[Any, ...]:
    async with db.read() as conn:
        row = await conn.fetchone(
            "SELECT status, lookup_key, current_period_start, current_period_end, "
            "stripe_event_created FROM licenses WHERE subscription_id = ?",
            sub_id,
        )
    assert row is not None
    return tuple(row[i] for i in range(5))


async def test_older_update_after_a_newer_one_keeps_the_newer_state(db: Database) -> None:
    """updated@T+60 (renewed, pro) then a late updated@T (past_due, basic): the first stays."""
    svc = service(db)
    newer = subscription(
        "active",
        lookup_key="aza_pro_monthly",
        metadata=PRAC_SUB,
        period_start=T + MONTH,
        period_end=T + 2 * MONTH,
    )
    older = subscription("past_due", metadata=PRAC_SUB, period_start=T, period_end=T + MONTH)
    first = await deliver(svc, event("customer.subscription.updated", newer, created=T + 60))
    late = await deliver(svc, event("customer.subscription.updated", older, created=T))

    assert first["result"]["reason"] is None
    # Acknowledged (Stripe must not retry it), recorded, and nothing changed.
    assert (late["handled"], late["duplicate"], late["result"]["reason"]) == (
        True,
        False,
        "stale_event",
    )
    assert await count(db, EVENTS) == 2
    assert await license_state(db) == (
        "active",
        "aza_pro_monthly",
        T + MONTH,
        T + 2 * MONTH,
        T + 60,
    )


async def test_stale_update_after_deleted_stays_canceled(db: Database) -> None:
    """created@T, deleted@T+20, then a retried updated@T+10 (active): still canceled."""
    svc = service(db)
    sub = subscription("active", metadata=PRAC_SUB)
    await deliver(svc, event("customer.subscription.created", sub, created=T))
    await deliver(
        svc, event("customer.subscription.deleted", {**sub, "status": "canceled"}, created=T + 20)
    )
    late = await deliver(svc, event("customer.subscription.updated", sub, created=T + 10))
    assert late["result"]["reason"] == "stale_event"
    assert (await license_state(db))[0] == "canceled"
    assert (await license_state(db))[4] == T + 20


async def test_same_second_update_does_not_revive_a_deleted_subscription(db: Database) -> None:
    """updated and deleted in one second, deleted delivered first: canceled is final."""
    svc = service(db)
    sub = subscription("active", metadata=PRAC_SUB)
    await deliver(svc, event("customer.subscription.deleted", sub, created=T))
    late = await deliver(svc, event("customer.subscription.updated", sub, created=T))
    assert late["result"]["reason"] == "stale_event"
    assert (await license_state(db))[0] == "canceled"


async def test_events_of_the_same_second_apply(db: Database) -> None:
    """Ties apply: two different updates with one `created` leave the one handled last."""
    svc = service(db)
    await deliver(
        svc,
        event(
            "customer.subscription.updated", subscription("active", metadata=PRAC_SUB), created=T
        ),
    )
    r = await deliver(
        svc,
        event(
            "customer.subscription.updated", subscription("past_due", metadata=PRAC_SUB), created=T
        ),
    )
    assert r["result"]["reason"] is None
    assert (await license_state(db))[0] == "past_due"


async def test_same_event_twice_is_idempotent(db: Database) -> None:
    """A redelivered event is a duplicate; handled twice, it writes the same state."""
    svc = service(db)
    body = event(
        "customer.subscription.updated",
        subscription("past_due", lookup_key="aza_pro_monthly", metadata=PRAC_SUB),
        created=T,
    )
    assert (await deliver(svc, body))["duplicate"] is False
    assert (await deliver(svc, body))["duplicate"] is True
    after_delivery = await license_state(db)
    assert after_delivery == ("past_due", "aza_pro_monthly", 1_760_000_000, 1_762_592_000, T)

    # The handler itself, again with the same event (as if its id had not been recorded).
    sub = json.loads(body)["data"]["object"]
    async with db.transaction(lock="prac_sub") as conn:
        again = await subscriptions.subscription_event(
            conn,
            Delivery(
                event=parse_event("evt_again", "customer.subscription.updated", T, sub),
                now=int(time.time()),
                config=CreditConfig.defaults(),
            ),
        )
    assert (again.handled, again.reason) == (True, None)
    assert await license_state(db) == after_delivery


async def test_a_row_without_event_time_accepts_any_event(db: Database) -> None:
    """Rows written outside the webhook (admin, CLI, demo, seed) have NULL: never blocking."""
    await add_license(db)  # sub_top, active, its column NULL
    assert (await license_state(db, SUBSCRIPTION))[4] is None
    svc = service(db)
    # Even an event from long ago applies to it, and from then on orders later ones.
    r = await deliver(
        svc,
        event(
            "customer.subscription.updated",
            subscription("past_due", sub_id=SUBSCRIPTION, lookup_key="aza_pro_monthly"),
            created=1_600_000_000,
        ),
    )
    assert (r["handled"], r["result"]["reason"]) == (True, None)
    assert await license_state(db, SUBSCRIPTION) == (
        "past_due",
        "aza_pro_monthly",
        1_760_000_000,
        1_762_592_000,
        1_600_000_000,
    )
    stale = await deliver(
        svc,
        event(
            "customer.subscription.updated",
            subscription("active", sub_id=SUBSCRIPTION),
            created=1_599_999_999,
        ),
    )
    assert stale["result"]["reason"] == "stale_event"
    assert (await license_state(db, SUBSCRIPTION))[0] == "past_due"


async def test_an_event_without_created_applies_and_keeps_the_stored_time(db: Database) -> None:
    """Stripe always sends `created`; a hand-made event without it applies, ordering nothing."""
    svc = service(db)
    sub = subscription("active", metadata=PRAC_SUB)
    await deliver(svc, event("customer.subscription.updated", sub, created=T))
    body = json.loads(event("customer.subscription.updated", {**sub, "status": "past_due"}))
    del body["created"]
    r = await deliver(svc, json.dumps(body).encode())
    assert r["result"]["reason"] is None
    assert await license_state(db) == ("past_due", "aza_basic_monthly", T, T + MONTH, T)


def test_setup_ids_fixture_is_consistent() -> None:
    """The seed constants used in these payloads match credit's (guards against drift)."""
    assert SUBSCRIPTION == "sub_top" and PRACTICE == "prac_top"
