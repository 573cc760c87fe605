"""The triggers of migration 012 on both engines: each alert once, in the writing transaction."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from budget.pricing import PlanBook
from budget.usage import Operation, Usage
from credit.autotopup import pause
from credit.config import CreditConfig
from credit.ledger import EventType, NewEntry, Status, fail_pending, insert_entry, settle_pending
from gateway.alerts.delivery import AlertDispatcher, WebhookSender
from gateway.alerts.store import AlertSettings, AlertStore
from gateway.storage import AnyDatabase, open_database
from gateway.storage.metering import MeteringStore
from tests.alerts.receivers import Receiver, wait_for
from tests.credit.helpers import save
from tests.integration.conftest import serve

USD = 1_000_000


async def rows(db: AnyDatabase, practice: str) -> list[tuple[str, str]]:
    async with db.read() as conn:
        found = await conn.fetchall(
            "SELECT alert_type, dedupe_key FROM ai_alert_outbox WHERE practice_id = ? "
            "ORDER BY alert_type, dedupe_key",
            practice,
        )
    return [(r[0], r[1]) for r in found]


async def charge(metering: MeteringStore, practice: str, micros: int, request_id: str) -> int:
    state = await metering.state(practice)
    assert state.license is not None and state.period is not None
    await metering.record_usage(
        state.license,
        state.period,
        Usage(Operation.CHAT, "gpt-4o-mini"),
        cost_micros=micros,
        request_id=request_id,
    )
    return state.period.start


async def period_of(metering: MeteringStore, practice: str) -> tuple[int, int]:
    state = await metering.state(practice)
    assert state.period is not None
    return state.period.start, state.snapshot.budget_micros


async def test_default_thresholds_fire_once_each(
    db: AnyDatabase, metering: MeteringStore, practice: str
) -> None:
    """Without settings the defaults (50, 80, 95, 100 %) apply; one usage past two marks
    writes both, and usage after that writes none again."""
    alerts = AlertStore(db)
    start, budget = await period_of(metering, practice)
    await alerts.ensure_marks(practice, start, budget)
    await charge(metering, practice, 9 * USD, "a")
    assert await rows(db, practice) == []
    await charge(metering, practice, 8 * USD, "b")  # 17 of 20: past 50 and 80
    assert await rows(db, practice) == [
        ("budget.threshold_crossed", f"50:{start}"),
        ("budget.threshold_crossed", f"80:{start}"),
    ]
    await charge(metering, practice, 1, "c")
    assert len(await rows(db, practice)) == 2
    pending = await alerts.pending(practice, start)
    assert [p["data"]["threshold_percent"] for p in pending] == [50, 80]


async def test_ledger_entries_write_their_alerts_once(
    db: AnyDatabase, metering: MeteringStore, practice: str
) -> None:
    """A credited purchase, a settled and a failed automatic top-up, and a pause that needs
    the card confirmed each write their alert, once, with the ledger entry."""
    now = int(time.time())
    await save(db, practice=practice)
    async with db.transaction(lock=practice) as conn:
        bought = await insert_entry(
            conn,
            NewEntry(
                practice_id=practice,
                event_type=EventType.TOPUP_PURCHASE,
                status=Status.SUCCEEDED,
                amount_micros=10 * USD,
                paid_rappen=3000,
                checkout_session_id="cs_1",
            ),
            now=now,
        )
        pending = await insert_entry(
            conn,
            NewEntry(
                practice_id=practice,
                event_type=EventType.AUTO_TOPUP_PURCHASE,
                status=Status.PENDING,
                amount_micros=10 * USD,
                paid_rappen=3000,
            ),
            now=now,
        )
    assert await rows(db, practice) == [("topup.succeeded", str(bought))]
    async with db.transaction(lock=practice) as conn:
        await settle_pending(conn, pending, payment_intent_id="pi_1", event_id=None, now=now)
        await settle_pending(conn, pending, payment_intent_id="pi_1", event_id=None, now=now)
    async with db.transaction(lock=practice) as conn:
        failing = await insert_entry(
            conn,
            NewEntry(
                practice_id=practice,
                event_type=EventType.AUTO_TOPUP_PURCHASE,
                status=Status.PENDING,
                amount_micros=10 * USD,
                paid_rappen=3000,
            ),
            now=now,
        )
    async with db.transaction(lock=practice) as conn:
        assert await fail_pending(
            conn, failing, payment_intent_id="pi_2", reason="requires_action", now=now
        )
        await pause(conn, practice, "AUTO_TOPUP_REQUIRES_ACTION", CreditConfig.defaults(), now=now)
    assert await rows(db, practice) == [
        ("auto_topup.failed", str(failing)),
        ("auto_topup.paused", str(now)),
        ("payment.action_required", str(now)),
        ("topup.succeeded", str(bought)),
        ("topup.succeeded", str(pending)),
    ]
    claimed = await AlertStore(db).claim_due(now_ms=int(time.time() * 1000), claim_ms=1000)
    bodies = {c.alert.type: c.alert.body() for c in claimed}
    assert bodies["topup.succeeded"]["data"]["credit_usd"] == "10.00"
    assert bodies["auto_topup.failed"]["data"] == {
        "ledger_id": failing,
        "reason": "requires_action",
        "amount_chf": "30.00",
    }
    for body in bodies.values():
        assert "pm_" not in str(body) and "pi_" not in str(body)


async def test_credit_low_once_until_the_next_top_up(
    db: AnyDatabase, metering: MeteringStore, practice: str
) -> None:
    """Extra credit falling below the practice's amount writes credit.low once; after a
    top-up it can fire again."""
    alerts = AlertStore(db)
    start, budget = await period_of(metering, practice)
    await alerts.save_settings(
        practice, AlertSettings(extra_credit_below_micros=5 * USD), period=(start, budget)
    )

    async def credit(usd: int, ref: str) -> None:
        async with db.transaction(lock=practice) as conn:
            await insert_entry(
                conn,
                NewEntry(
                    practice_id=practice,
                    event_type=EventType.ADMIN_ADJUSTMENT,
                    status=Status.SUCCEEDED,
                    amount_micros=usd * USD,
                    idempotency_key=ref,
                ),
                now=int(time.time()),
            )

    await credit(10, "adj1")
    await charge(metering, practice, 20 * USD, "budget")  # the budget, all of it
    await charge(metering, practice, 4 * USD, "c1")  # credit 6 left
    assert [t for t, _ in await rows(db, practice) if t == "credit.low"] == []
    await charge(metering, practice, 2 * USD, "c2")  # 4 left: below 5
    await charge(metering, practice, 1 * USD, "c3")
    assert [t for t, _ in await rows(db, practice) if t == "credit.low"] == ["credit.low"]
    await credit(10, "adj2")  # 13 left
    await charge(metering, practice, 9 * USD, "c4")  # 4 left again
    assert [t for t, _ in await rows(db, practice) if t == "credit.low"] == ["credit.low"] * 2


@pytest.fixture
async def second_db(database_url: str) -> AsyncIterator[AnyDatabase]:
    """Another connection pool on the same database: a second gateway instance."""
    other = await open_database(database_url, pool_size=5)
    try:
        yield other
    finally:
        await other.close()


async def test_two_instances_crossing_at_once_send_one_alert(
    db: AnyDatabase,
    second_db: AnyDatabase,
    metering: MeteringStore,
    plans: PlanBook,
    practice: str,
) -> None:
    """Two instances settle past the same mark at the same moment and both deliver: the
    receiver gets the alert once."""
    receiver = Receiver()
    other = MeteringStore(second_db, plans=plans)
    start, budget = await period_of(metering, practice)
    stores = [AlertStore(db), AlertStore(second_db)]
    async with serve(receiver) as url:
        await stores[0].save_settings(
            practice,
            AlertSettings(budget_used_percent=(50,), webhook_url=url, webhook_secret="whsec_t"),
            period=(start, budget),
        )
        await charge(metering, practice, 9 * USD, "base")
        await asyncio.gather(
            *(charge(m, practice, 2 * USD, f"at-once-{i}") for i, m in enumerate([metering, other]))
        )
        assert await rows(db, practice) == [("budget.threshold_crossed", f"50:{start}")]
        senders = [WebhookSender(allow_private=True) for _ in stores]
        dispatchers = [
            AlertDispatcher(store, mailer=None, webhooks=sender, poll_seconds=0.02)
            for store, sender in zip(stores, senders, strict=True)
        ]
        tasks = [asyncio.create_task(d.run()) for d in dispatchers]
        try:
            await wait_for(lambda: receiver.deliveries)
            await asyncio.sleep(0.2)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for sender in senders:
                await sender.aclose()
    assert len(receiver.deliveries) == 1
