"""Automatic top-up through CreditService: guards, charge, failures, reconciliation (both engines).

Stripe is faked at the HTTP level (respx) behind the real StripeClientAdapter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
import respx

from credit.ledger import EventType, Status, month_start
from credit.ports import Database
from gateway.messages import user_message

from .helpers import (
    PRACTICE,
    STRIPE_BASE,
    STRIPE_HTTPX_DEPRECATION,
    SUBSCRIPTION,
    Clock,
    add_license,
    book,
    card_error,
    count,
    form,
    payment_intent_json,
    save,
    service,
    stripe_adapter,
)

pytestmark = pytest.mark.filterwarnings(STRIPE_HTTPX_DEPRECATION)

PI_SQL = "SELECT COUNT(*) FROM ai_credit_ledger WHERE event_type = ?"


@pytest.fixture
def stripe_api() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=STRIPE_BASE, assert_all_called=False) as router:
        yield router


def live(db: Database, clock: Clock | None = None, **kw: object):  # type: ignore[no-untyped-def]
    """A service that really charges (test key, feature on, not dry run)."""
    return service(db, stripe=stripe_adapter(), clock=clock, **kw)


async def _settings(db: Database) -> tuple[bool, str | None, str | None, str | None]:
    async with db.read() as conn:
        row = await conn.fetchone(
            "SELECT auto_topup_enabled, stripe_customer_id, default_payment_method_id, "
            "paused_reason FROM ai_topup_settings WHERE practice_id = ?",
            PRACTICE,
        )
    assert row is not None
    return bool(row[0]), row[1], row[2], row[3]


# -- guards (the seed's) -------------------------------------------------------------


async def test_auto_topup_respects_monthly_limit(db: Database) -> None:
    """Two auto top-ups of 30 CHF this month reach a 60 CHF limit, even in dry run."""
    await save(db, credit="20", trigger=50, limit="60")
    for i in range(2):
        await book(db, event_type=EventType.AUTO_TOPUP_PURCHASE, checkout_session_id=f"cs_auto_{i}")
    r = await service(db, dry_run=True).maybe_auto_topup(
        PRACTICE, available_percent=5, subscription_id=SUBSCRIPTION
    )
    assert r.reason == "auto_topup_monthly_limit_reached"
    assert r.error_code == "AUTO_TOPUP_MONTHLY_LIMIT_REACHED"
    assert not r.charged and not r.dry_run


async def test_monthly_limit_counts_only_this_month(db: Database) -> None:
    """Auto top-ups of last month do not count against this month's limit."""
    await save(db, trigger=50, limit="60")
    last_month = int(time.time()) - 40 * 86_400
    for i in range(2):
        await book(
            db,
            event_type=EventType.AUTO_TOPUP_PURCHASE,
            created_at=last_month,
            payment_intent_id=f"pi_old_{i}",
        )
    r = await service(db, dry_run=True).maybe_auto_topup(
        PRACTICE, available_percent=5, subscription_id=None
    )
    assert r.dry_run is True


def utc(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


@pytest.mark.parametrize(
    ("now", "start"),
    [
        # 00:30 on 1 December in Zurich (CET, UTC+1): the new month began at 23:00 UTC.
        ("2026-11-30T23:30", "2026-11-30T23:00"),
        # 23:30 on 30 November in Zurich: still November, begun 1 November 00:00 CET.
        ("2026-11-30T22:30", "2026-10-31T23:00"),
        # Summer time (CEST, UTC+2): 1 July began at 22:00 UTC.
        ("2026-07-01T00:30", "2026-06-30T22:00"),
        # 23:00 on 31 March, summer time since the 29th: March began in winter time.
        ("2026-03-31T21:00", "2026-02-28T23:00"),
        # 01:00 on 1 April (CEST): April began at 22:00 UTC.
        ("2026-03-31T23:00", "2026-03-31T22:00"),
    ],
)
def test_month_start_is_the_zurich_calendar_month(now: str, start: str) -> None:
    assert month_start(utc(now), "Europe/Zurich") == utc(start)


def test_month_start_in_utc_is_the_utc_calendar_month() -> None:
    assert month_start(utc("2026-11-30T23:30"), "UTC") == utc("2026-11-01T00:00")


async def auto_topups_at(db: Database, *times: str) -> None:
    for i, at in enumerate(times):
        await book(
            db,
            event_type=EventType.AUTO_TOPUP_PURCHASE,
            created_at=utc(at),
            payment_intent_id=f"pi_{i}_{utc(at)}",
        )


async def limit_check(db: Database, at: str) -> tuple[str | None, float]:
    """The dry-run guard's reason at `at` (UTC), and the CHF it counts this month."""
    at_that_time = service(db, dry_run=True, clock=Clock(utc(at)))
    r = await at_that_time.maybe_auto_topup(PRACTICE, available_percent=5, subscription_id=None)
    status = await at_that_time.settings_status(PRACTICE)
    return r.reason, status["auto_topups_chf_this_month"]


async def test_the_monthly_limit_restarts_at_midnight_in_zurich(db: Database) -> None:
    """At 00:30 on 1 December in Zurich (23:30 UTC on the 30th) November's top-ups no longer count.

    Counted in UTC months, it would still be November there and the limit reached.
    """
    await save(db, trigger=50, limit="60")
    await auto_topups_at(db, "2026-11-10T09:00", "2026-11-20T09:00")
    assert await limit_check(db, "2026-11-30T22:45") == ("auto_topup_monthly_limit_reached", 60.0)
    assert await limit_check(db, "2026-11-30T23:30") == ("dry_run", 0.0)


async def test_a_top_up_just_after_midnight_in_zurich_counts_in_the_new_month(
    db: Database,
) -> None:
    """One at 00:10 on 1 December in Zurich (23:10 UTC on the 30th) and one on the 5th: limit.

    Counted in UTC months, the first would fall in November and a third be charged.
    """
    await save(db, trigger=50, limit="60")
    await auto_topups_at(db, "2026-11-30T23:10", "2026-12-05T09:00")
    assert await limit_check(db, "2026-12-15T09:00") == ("auto_topup_monthly_limit_reached", 60.0)


async def test_auto_monthly_limit_ignores_manual_topups(db: Database) -> None:
    """A 200 CHF manual top-up does not use up the automatic monthly limit."""
    await save(db, trigger=50, limit="300")
    await book(db, usd="66.6667", chf="200", checkout_session_id="cs_manual_big")
    status = await service(db).settings_status(PRACTICE)
    assert status["auto_topups_chf_this_month"] == 0.0
    r = await service(db, dry_run=True).maybe_auto_topup(
        PRACTICE, available_percent=5, subscription_id=None
    )
    assert r.dry_run is True and r.ok is True
    assert r.error_code == "AUTO_TOPUP_DRY_RUN"


async def test_no_auto_charge_without_payment_method(
    db: Database, stripe_api: respx.MockRouter
) -> None:
    """A customer without a saved card is never charged: no_payment_method."""
    await save(db, payment_method=None)
    r = await live(db).maybe_auto_topup(PRACTICE, available_percent=5, subscription_id=None)
    assert r.reason == "no_payment_method"
    assert r.error_code == "AUTO_TOPUP_NO_PAYMENT_METHOD"
    assert not stripe_api.calls


async def test_24h_cooldown_blocks_second_auto_topup(
    db: Database, stripe_api: respx.MockRouter
) -> None:
    """An auto top-up that succeeded an hour ago blocks the next one: cooldown_24h."""
    await save(db)
    await book(
        db,
        event_type=EventType.AUTO_TOPUP_PURCHASE,
        payment_intent_id="pi_recent",
        created_at=int(time.time()) - 3600,
    )
    r = await live(db).maybe_auto_topup(PRACTICE, available_percent=5, subscription_id=None)
    assert r.reason == "cooldown_24h" and r.error_code == "AUTO_TOPUP_COOLDOWN"
    assert not stripe_api.calls


async def test_pending_auto_topup_blocks_parallel(
    db: Database, stripe_api: respx.MockRouter
) -> None:
    """A pending auto top-up blocks another one: pending_auto_topup."""
    await book(db, event_type=EventType.AUTO_TOPUP_PURCHASE, status=Status.PENDING)
    await save(db)
    r = await live(db).maybe_auto_topup(PRACTICE, available_percent=5, subscription_id=None)
    assert r.reason == "pending_auto_topup" and r.error_code == "AUTO_TOPUP_PENDING"
    assert not stripe_api.calls


async def test_auto_topup_disabled_when_env_off(db: Database, stripe_api: respx.MockRouter) -> None:
    """Feature flag off: an allowed top-up is a dry run, nothing charged or written."""
    await save(db)
    r = await live(db, auto=False, allow_live=True).maybe_auto_topup(
        PRACTICE, available_percent=5, subscription_id=None
    )
    assert r.dry_run is True and r.charged is False
    assert not stripe_api.calls
    assert await count(db, "SELECT COUNT(*) FROM ai_credit_ledger") == 0


async def test_settings_disabled_and_above_trigger(db: Database) -> None:
    """Settings off → auto_topup_disabled; enough credit left → above_trigger."""
    await save(db, enabled=False)
    r = await service(db).maybe_auto_topup(PRACTICE, available_percent=5, subscription_id=None)
    assert (r.reason, r.error_code) == ("auto_topup_disabled", "AUTO_TOPUP_DISABLED")
    await save(db, trigger=10)
    r = await service(db).maybe_auto_topup(PRACTICE, available_percent=10, subscription_id=None)
    assert (r.reason, r.error_code) == ("above_trigger", "AUTO_TOPUP_ABOVE_TRIGGER")
    assert r.to_dict()["reason"] == "above_trigger"


async def test_live_key_blocked_without_allowance(
    db: Database, stripe_api: respx.MockRouter
) -> None:
    """A live key without AZA_AI_TOPUP_ALLOW_LIVE: LIVE_TOPUP_BLOCKED, no charge."""
    await save(db)
    r = await live(db, live_key=True).maybe_auto_topup(
        PRACTICE, available_percent=5, subscription_id=None
    )
    assert r.error_code == "LIVE_TOPUP_BLOCKED" and not r.charged
    assert not stripe_api.calls


async def test_no_stripe_configured(db: Database) -> None:
    """Without a Stripe key nothing can be charged: STRIPE_NOT_CONFIGURED, nothing written."""
    await save(db)
    r = await service(db, stripe=None).maybe_auto_topup(
        PRACTICE, available_percent=5, subscription_id=None
    )
    assert r.error_code == "STRIPE_NOT_CONFIGURED"
    assert await count(db, "SELECT COUNT(*) FROM ai_credit_ledger") == 0


# -- the charge ------------------------------------------------------------------------


async def test_live_auto_topup_mock_success(db: Database, stripe_api: respx.MockRouter) -> None:
    """A successful off-session charge credits 10 USD once; Stripe got the exact request."""
    await add_license(db)
    await save(db)
    route = stripe_api.post("/v1/payment_intents").mock(
        return_value=httpx.Response(200, json=payment_intent_json("pi_ok"))
    )
    r = await live(db, live_key=True, allow_live=True).maybe_auto_topup(
        PRACTICE, available_percent=5, subscription_id=SUBSCRIPTION
    )
    assert r.charged is True and r.ok is True and r.credited_micros == 10_000_000
    async with db.read() as conn:
        row = await conn.fetchone(
            "SELECT status, amount_internal_micro_usd, amount_paid_rappen, idempotency_key, "
            "customer_email, event_type FROM ai_credit_ledger "
            "WHERE stripe_payment_intent_id = 'pi_ok'"
        )
    assert row is not None
    assert (row[0], row[1], row[2], row[5]) == (
        "succeeded",
        10_000_000,
        3000,
        "auto_topup_purchase",
    )
    assert row[4] == "cli@example.test"
    request = route.calls.last.request
    sent = form(request)
    assert request.headers["Idempotency-Key"] == row[3]
    assert row[3].startswith(f"aza_auto_topup_{r.ledger_id}_")
    assert sent["amount"] == "3000" and sent["currency"] == "chf"
    assert sent["confirm"] == "true" and sent["off_session"] == "true"
    assert sent["customer"] == "cus_x" and sent["payment_method"] == "pm_test"
    assert sent["metadata[aza_purpose]"] == "ai_auto_topup"
    assert sent["metadata[practice_id]"] == PRACTICE
    assert sent["metadata[subscription_id]"] == SUBSCRIPTION
    assert sent["metadata[aza_ledger_id]"] == str(r.ledger_id)
    assert await service(db).extra_credit_micros(PRACTICE) == 10_000_000
    assert route.call_count == 1


async def test_failed_auto_topup_pauses_settings(
    db: Database, stripe_api: respx.MockRouter
) -> None:
    """requires_action: not charged, paused, one failed_auto_topup row of 0, card kept."""
    await save(db)
    stripe_api.post("/v1/payment_intents").mock(
        return_value=httpx.Response(
            200, json=payment_intent_json("pi_fail", status="requires_action")
        )
    )
    r = await live(db).maybe_auto_topup(PRACTICE, available_percent=5, subscription_id=None)
    assert r.charged is False and r.paused is True
    assert r.error_code == "AUTO_TOPUP_REQUIRES_ACTION" and r.reason == "requires_action"
    enabled, customer, pm, paused = await _settings(db)
    assert enabled is False and (customer, pm) == ("cus_x", "pm_test")
    assert paused == "AUTO_TOPUP_REQUIRES_ACTION"
    assert await count(db, PI_SQL, "failed_auto_topup") == 1
    assert await count(db, "SELECT COUNT(*) FROM ai_credit_ledger WHERE status <> 'failed'") == 0
    assert await service(db).extra_credit_micros(PRACTICE) == 0
    history = await service(db).history(PRACTICE)
    assert history[0]["status"] == "failed" and history[0]["amount_internal_usd"] == 0.0


@pytest.mark.parametrize(
    ("code", "decline", "error_code"),
    [
        ("card_declined", "insufficient_funds", "AUTO_TOPUP_PAYMENT_FAILED"),
        ("authentication_required", None, "AUTO_TOPUP_REQUIRES_ACTION"),
        ("card_declined", "authentication_required", "AUTO_TOPUP_REQUIRES_ACTION"),
    ],
)
async def test_card_errors_pause_and_keep_card(
    db: Database, stripe_api: respx.MockRouter, code: str, decline: str | None, error_code: str
) -> None:
    """A 402 card error fails the entry (amount 0), pauses auto top-up and keeps the card."""
    await save(db)
    stripe_api.post("/v1/payment_intents").mock(
        return_value=card_error(code, decline_code=decline, pi_id="pi_declined")
    )
    r = await live(db).maybe_auto_topup(PRACTICE, available_percent=5, subscription_id=None)
    assert r.error_code == error_code and r.paused and not r.charged
    enabled, customer, pm, _ = await _settings(db)
    assert not enabled and (customer, pm) == ("cus_x", "pm_test")
    async with db.read() as conn:
        row = await conn.fetchone(
            "SELECT event_type, status, amount_internal_micro_usd, stripe_payment_intent_id "
            "FROM ai_credit_ledger"
        )
    assert row is not None and tuple(row) == ("failed_auto_topup", "failed", 0, "pi_declined")
    # paused: the next attempt does not charge
    r2 = await live(db).maybe_auto_topup(PRACTICE, available_percent=5, subscription_id=None)
    assert r2.reason == "auto_topup_disabled"


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectTimeout("slow"),
        httpx.ReadTimeout("slow"),
        httpx.Response(503, json={"error": {"type": "api_error"}}),
    ],
    ids=["connect-timeout", "read-timeout", "503"],
)
async def test_unknown_outcome_stays_pending_then_reconcile_settles(
    db: Database, stripe_api: respx.MockRouter, failure: object
) -> None:
    """Timeout/5xx leave the entry pending; reconcile re-sends with the SAME key and settles it."""
    await save(db)
    clock = Clock()
    route = stripe_api.post("/v1/payment_intents")
    if isinstance(failure, httpx.Response):
        route.mock(side_effect=[failure, httpx.Response(200, json=payment_intent_json("pi_late"))])
    else:
        route.mock(side_effect=[failure, httpx.Response(200, json=payment_intent_json("pi_late"))])
    svc = live(db, clock)
    r = await svc.maybe_auto_topup(PRACTICE, available_percent=5, subscription_id=None)
    assert r.error_code == "AUTO_TOPUP_STRIPE_UNAVAILABLE" and not r.charged and not r.paused
    assert await count(db, "SELECT COUNT(*) FROM ai_credit_ledger WHERE status = 'pending'") == 1
    assert await svc.reconcile_pending() == 0  # too young: may still be in flight elsewhere
    assert route.call_count == 1
    clock.advance(300)
    assert await svc.reconcile_pending() == 1
    assert route.call_count == 2
    keys = {call.request.headers["Idempotency-Key"] for call in route.calls}
    assert len(keys) == 1
    assert await svc.extra_credit_micros(PRACTICE) == 10_000_000
    assert await count(db, "SELECT COUNT(*) FROM ai_credit_ledger") == 1
    assert await svc.reconcile_pending() == 0  # nothing left


async def test_processing_then_reconcile_retrieves(
    db: Database, stripe_api: respx.MockRouter
) -> None:
    """A processing PaymentIntent stays pending with its id; reconcile retrieves and settles it."""
    await save(db)
    stripe_api.post("/v1/payment_intents").mock(
        return_value=httpx.Response(200, json=payment_intent_json("pi_proc", status="processing"))
    )
    get = stripe_api.get("/v1/payment_intents/pi_proc").mock(
        return_value=httpx.Response(200, json=payment_intent_json("pi_proc"))
    )
    svc = live(db)
    r = await svc.maybe_auto_topup(PRACTICE, available_percent=5, subscription_id=None)
    assert r.ok and not r.charged and r.reason == "payment_processing"
    assert await svc.extra_credit_micros(PRACTICE) == 0
    assert await svc.reconcile_pending(PRACTICE) == 1
    assert get.call_count == 1
    assert await svc.extra_credit_micros(PRACTICE) == 10_000_000


async def test_reconcile_failed_intent_pauses(db: Database, stripe_api: respx.MockRouter) -> None:
    """A pending top-up whose PaymentIntent later needs action is failed and pauses auto top-up."""
    await save(db)
    await book(
        db,
        event_type=EventType.AUTO_TOPUP_PURCHASE,
        status=Status.PENDING,
        usd="10",
        payment_intent_id="pi_stuck",
    )
    stripe_api.get("/v1/payment_intents/pi_stuck").mock(
        return_value=httpx.Response(
            200, json=payment_intent_json("pi_stuck", status="requires_payment_method")
        )
    )
    assert await live(db).reconcile_pending() == 1
    assert await count(db, PI_SQL, "failed_auto_topup") == 1
    assert (await _settings(db))[0] is False


async def test_next_maybe_auto_topup_reconciles_first(
    db: Database, stripe_api: respx.MockRouter
) -> None:
    """A leftover pending top-up is settled when the next attempt starts (which then cools down)."""
    await save(db)
    await book(
        db,
        event_type=EventType.AUTO_TOPUP_PURCHASE,
        status=Status.PENDING,
        usd="10",
        payment_intent_id="pi_left",
    )
    stripe_api.get("/v1/payment_intents/pi_left").mock(
        return_value=httpx.Response(200, json=payment_intent_json("pi_left"))
    )
    create = stripe_api.post("/v1/payment_intents")
    r = await live(db).maybe_auto_topup(PRACTICE, available_percent=5, subscription_id=None)
    assert r.reason == "cooldown_24h"
    assert create.call_count == 0
    assert await service(db).extra_credit_micros(PRACTICE) == 10_000_000


async def test_concurrent_auto_topups_send_one_payment_intent(
    db: Database, stripe_api: respx.MockRouter
) -> None:
    """Two simultaneous maybe_auto_topup calls (two services, one database): one Stripe request."""
    await save(db)

    async def slow_ok(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.2)
        return httpx.Response(200, json=payment_intent_json("pi_once"))

    route = stripe_api.post("/v1/payment_intents").mock(side_effect=slow_ok)
    a, b = live(db), live(db)
    results = await asyncio.gather(
        a.maybe_auto_topup(PRACTICE, available_percent=1, subscription_id=None),
        b.maybe_auto_topup(PRACTICE, available_percent=1, subscription_id=None),
    )
    assert route.call_count == 1
    assert sorted(r.charged for r in results) == [False, True]
    loser = next(r for r in results if not r.charged)
    assert loser.reason in ("pending_auto_topup", "cooldown_24h")
    assert await a.extra_credit_micros(PRACTICE) == 10_000_000


async def test_gate_retries_after_mock_auto_topup_credit(
    db: Database,
    stripe_api: respx.MockRouter,
    metering,
    practice: str,  # type: ignore[no-untyped-def]
) -> None:
    """Budget used up: an auto top-up adds extra credit the budget snapshot then admits."""
    state = await metering.state(practice)
    async with db.transaction(lock=practice) as conn:
        await conn.execute(
            "INSERT INTO ai_usage_period_totals (practice_id, period_start, used_micro_usd, "
            "used_credit_micro_usd, events) VALUES (?, ?, ?, 0, 1)",
            practice,
            state.period.start,
            state.snapshot.budget_micros,
        )
    blocked = (await metering.state(practice)).snapshot
    assert blocked.available_micros == 0 and blocked.available_percent == 0
    await save(db)
    stripe_api.post("/v1/payment_intents").mock(
        return_value=httpx.Response(200, json=payment_intent_json("pi_gate"))
    )
    r = await live(db).maybe_auto_topup(
        practice, available_percent=blocked.available_percent, subscription_id=SUBSCRIPTION
    )
    assert r.charged
    after = (await metering.state(practice)).snapshot
    assert after.remaining_micros == 0
    assert after.extra_credit_micros == 10_000_000 == after.available_micros


async def test_gate_reports_auto_monthly_limit_message(db: Database) -> None:
    """At the monthly limit the code is the seed's and its user message says 'manuell'."""
    await save(db, trigger=50, limit="60")
    for i in range(2):
        await book(
            db,
            usd="10",
            event_type=EventType.AUTO_TOPUP_PURCHASE,
            payment_intent_id=f"pi_gate_cap_{i}",
        )
    r = await service(db).maybe_auto_topup(PRACTICE, available_percent=0, subscription_id=None)
    assert r.error_code == "AUTO_TOPUP_MONTHLY_LIMIT_REACHED"
    assert "manuell" in user_message(r.error_code).lower()
