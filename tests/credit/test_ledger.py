"""The ledger through CreditService: balances, history, admin view, adjustments (both engines)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from credit.errors import CreditError
from credit.ledger import EventType, Status, exists_for_checkout, exists_for_payment_intent
from credit.ports import Database
from credit.stripe_ids import mask_stripe_reference
from gateway.errors import credit_status
from gateway.storage import migrate

from .helpers import PRACTICE, book, count, service


async def test_ledger_schema_idempotent(db: Database) -> None:
    """Migrating again changes nothing, and the ledger has the seed's columns."""
    assert await migrate(db) == []  # type: ignore[arg-type]
    async with db.read() as conn:
        row = await conn.fetchone(
            "SELECT event_type, status, amount_internal_usd, amount_paid_chf, meta_json "
            "FROM ai_credit_ledger LIMIT 1"
        )
    assert row is None


async def test_usage_events_unchanged_schema(db: Database) -> None:
    """ai_usage_events keeps the seed's estimated_cost_usd and subscription_id columns."""
    async with db.read() as conn:
        assert (
            await conn.fetchone("SELECT estimated_cost_usd, subscription_id FROM ai_usage_events")
            is None
        )


async def test_meta_json_no_secrets(db: Database) -> None:
    """meta_json drops secret-like keys and payment method ids, keeps harmless notes."""
    from credit.ledger import NewEntry, insert_entry

    async with db.transaction(lock=PRACTICE) as conn:
        ledger_id = await insert_entry(
            conn,
            NewEntry(
                practice_id=PRACTICE,
                event_type=EventType.TOPUP_PURCHASE,
                status=Status.SUCCEEDED,
                amount_micros=1_000_000,
                meta={
                    "note": "ok",
                    "api_secret_key": "must_not_store",
                    "default_payment_method_id": "pm_x",
                    "card_last4": "4242",
                    "nested": {"access_token": "t", "kept": 1},
                    "innocent_looking": "pm_sneaky",
                },
            ),
            now=1,
        )
        raw = await conn.fetchval("SELECT meta_json FROM ai_credit_ledger WHERE id = ?", ledger_id)
    meta = json.loads(raw)
    assert meta == {"note": "ok", "nested": {"kept": 1}}
    assert "pm_" not in raw and "must_not_store" not in raw


async def test_ledger_exists_for_checkout(db: Database) -> None:
    """A checkout session counts as booked once a (not failed) purchase carries it."""
    async with db.read() as conn:
        assert not await exists_for_checkout(conn, "cs_new")
    await book(db, usd="1", checkout_session_id="cs_new")
    await book(db, usd="0", status=Status.FAILED, checkout_session_id="cs_failed")
    async with db.read() as conn:
        assert await exists_for_checkout(conn, "cs_new")
        assert not await exists_for_checkout(conn, "cs_failed")
        assert not await exists_for_payment_intent(conn, "pi_none")


async def test_amounts_are_exact_integers(db: Database) -> None:
    """6.666667 USD and 22.50 CHF are stored as exact integers; the derived columns agree."""
    await book(db, usd="6.666667", chf="22.50", payment_intent_id="pi_exact")
    async with db.read() as conn:
        row = await conn.fetchone(
            "SELECT amount_internal_micro_usd, amount_paid_rappen, amount_internal_usd, "
            "amount_paid_chf FROM ai_credit_ledger WHERE stripe_payment_intent_id = 'pi_exact'"
        )
    assert row is not None
    assert (row[0], row[1]) == (6_666_667, 2250)
    assert Decimal(str(row[2])) == Decimal("6.666667")
    assert Decimal(str(row[3])) == Decimal("22.5")


async def test_extra_credit_is_succeeded_entries_minus_credit_used(db: Database) -> None:
    """Only succeeded entries count, minus usage charged to credit; pending/failed do not."""
    svc = service(db)
    await book(db, usd="20", checkout_session_id="cs_a")
    await book(db, usd="10", event_type=EventType.AUTO_TOPUP_PURCHASE, status=Status.PENDING)
    await book(db, usd="0", status=Status.FAILED, checkout_session_id="cs_b")
    await book(db, usd="-5", chf="-7.50", event_type=EventType.REFUND)
    async with db.transaction(lock=PRACTICE) as conn:
        await conn.execute(
            "INSERT INTO ai_usage_period_totals (practice_id, period_start, used_micro_usd, "
            "used_credit_micro_usd, events) VALUES (?, 1, 30000000, 2500000, 3)",
            PRACTICE,
        )
    assert await svc.extra_credit_micros(PRACTICE) == 20_000_000 - 5_000_000 - 2_500_000
    assert await svc.extra_credit_micros("prac_other") == 0


async def test_month_rollover_extra_persists(db: Database) -> None:
    """Extra credit does not depend on the budget period: a new period keeps it whole."""
    svc = service(db)
    await book(db, usd="15", chf="22.50", checkout_session_id="cs_roll")
    before = await svc.extra_credit_micros(PRACTICE)
    async with db.transaction(lock=PRACTICE) as conn:  # usage of a period paid by the budget
        await conn.execute(
            "INSERT INTO ai_usage_period_totals (practice_id, period_start, used_micro_usd, "
            "used_credit_micro_usd, events) VALUES (?, 1, 20000000, 0, 1)",
            PRACTICE,
        )
    assert await svc.extra_credit_micros(PRACTICE) == before == 15_000_000


async def test_history_only_own_practice(db: Database) -> None:
    """A practice's history holds its own entries only, never another practice's references."""
    await book(db, payment_intent_id="pi_prac_top_secret")
    await book(db, practice="prac_other", payment_intent_id="pi_other_secret")
    items = await service(db).history(PRACTICE)
    assert len(items) == 1
    assert items[0]["amount_paid_chf"] == 30.0
    assert "pi_other_secret" not in json.dumps(items)
    assert "pi_prac_top_secret" not in json.dumps(items)


async def test_history_masks_stripe_ids(db: Database) -> None:
    """History shows the masked PaymentIntent reference, without its tail."""
    await book(db, payment_intent_id="pi_1234567890abcdef")
    items = await service(db).history(PRACTICE)
    assert items[0]["stripe_payment_reference"] == mask_stripe_reference("pi_1234567890abcdef")
    assert "abcdef" not in json.dumps(items)


async def test_history_shows_failed_and_refund(db: Database) -> None:
    """Failed attempts and refunds (negative) appear in the history."""
    await book(db, usd="0", status=Status.FAILED)
    await book(db, usd="-10", chf="-15", event_type=EventType.REFUND)
    items = await service(db).history(PRACTICE)
    assert {i["status"] for i in items} == {"failed", "succeeded"}
    refund = next(i for i in items if i["event_type"] == "refund")
    assert refund["amount_internal_usd"] == -10.0
    assert refund["amount_paid_chf"] == -15.0


async def test_history_shows_ledger_value_not_recalculated(db: Database) -> None:
    """Entries keep the values written then (6.6667 USD for 10 CHF), not today's 3.333333."""
    await book(db, usd="6.6667", chf="10", payment_intent_id="pi_old_rate")
    await book(
        db,
        usd="20",
        chf="30",
        event_type=EventType.AUTO_TOPUP_PURCHASE,
        payment_intent_id="pi_old_auto",
    )
    items = await service(db).history(PRACTICE)
    assert sorted(i["amount_internal_usd"] for i in items) == [6.6667, 20.0]
    assert sorted(i["amount_internal_micro_usd"] for i in items) == [6_666_700, 20_000_000]


async def test_history_limit_and_order(db: Database) -> None:
    """History is newest first and honours the limit."""
    for i in range(3):
        await book(db, usd=str(i + 1), created_at=1_700_000_000 + i, checkout_session_id=f"cs_{i}")
    items = await service(db).history(PRACTICE, limit=2)
    assert [i["amount_internal_usd"] for i in items] == [3.0, 2.0]


async def test_admin_ledger_helper_unchanged(db: Database) -> None:
    """The admin ledger lists the practice's entries, each with checkout_session_masked."""
    await book(db, usd="1", checkout_session_id="cs_admin_check")
    entries = await service(db).admin_ledger(PRACTICE)
    assert len(entries) == 1
    assert entries[0]["checkout_session_masked"] == "cs_admi…"
    assert "cs_admin_check" not in json.dumps(entries)


async def test_admin_adjustment_positive_and_negative(db: Database) -> None:
    """Adjustments book exact USD either way, succeeded, with note and actor."""
    svc = service(db)
    plus = await svc.adjust(PRACTICE, amount_usd=Decimal("12.5"), note="goodwill", actor="ops")
    minus = await svc.adjust(PRACTICE, amount_usd=Decimal("-2.25"), note="correction", actor="ops")
    assert plus["event_type"] == "admin_adjustment" and plus["status"] == "succeeded"
    assert plus["meta"] == {"actor": "ops", "note": "goodwill"}
    assert minus["amount_internal_micro_usd"] == -2_250_000
    assert await svc.extra_credit_micros(PRACTICE) == 10_250_000


@pytest.mark.parametrize(
    ("amount", "note", "param"),
    [
        (Decimal("0"), "x", "amount_usd"),
        (Decimal("NaN"), "x", "amount_usd"),
        (Decimal("1e9"), "x", "amount_usd"),
        (Decimal("1.0000001"), "x", "amount_usd"),
        (Decimal("1"), "   ", "note"),
    ],
)
async def test_admin_adjustment_rejects_bad_input(
    db: Database, amount: Decimal, note: str, param: str
) -> None:
    """Zero, NaN, absurd or over-precise amounts and empty notes are 422s; nothing is written."""
    with pytest.raises(CreditError) as info:
        await service(db).adjust(PRACTICE, amount_usd=amount, note=note, actor="ops")
    assert credit_status(info.value) == 422 and info.value.param == param
    assert await count(db, "SELECT COUNT(*) FROM ai_credit_ledger") == 0
