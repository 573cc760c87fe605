"""The metering store on both engines: keys, licenses, holds, usage events, totals."""

from __future__ import annotations

import asyncio
import time

from budget.license import License, LicenseProblem, Period
from budget.operations import Operation
from budget.pricing import PlanBook
from budget.usage import Usage
from gateway.storage import AnyDatabase
from gateway.storage.keys import hash_key
from gateway.storage.metering import MeteringStore

USD = 1_000_000  # micro-USD per USD


def chat(model: str = "gpt-4o-mini") -> Usage:
    return Usage(operation=Operation.CHAT, model=model, input_tokens=10, output_tokens=5)


async def add_credit(
    db: AnyDatabase, practice_id: str, micros: int, status: str = "succeeded"
) -> None:
    now = int(time.time())
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO ai_credit_ledger (practice_id, event_type, status, "
            "amount_internal_micro_usd, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            practice_id,
            "topup_purchase",
            status,
            micros,
            now,
            now,
        )


async def spend(metering: MeteringStore, practice_id: str, micros: int, request_id: str) -> None:
    state = await metering.state(practice_id)
    assert state.license is not None and state.period is not None
    await metering.record_usage(
        state.license, state.period, chat(), cost_micros=micros, request_id=request_id
    )


async def test_key_is_stored_hashed_and_resolves_to_its_practice(
    metering: MeteringStore, db: AnyDatabase
) -> None:
    """A new key resolves to its practice; the database holds only its hash."""
    key = await metering.create_key("prac_top")
    assert await metering.practice_for_key(key) == "prac_top"
    assert await metering.practice_for_key(key + "x") is None
    async with db.read() as conn:
        stored = await conn.fetchall("SELECT key_hash, key_prefix FROM gateway_keys")
    assert [row["key_hash"] for row in stored] == [hash_key(key)]
    assert key not in {row["key_hash"] for row in stored}
    assert len(stored[0]["key_prefix"]) < len(key) // 2


async def test_revoked_key_stops_resolving(metering: MeteringStore) -> None:
    """Revoking by prefix makes the key unknown."""
    key = await metering.create_key("prac_top")
    assert await metering.revoke_key(key[:10]) == 1
    assert await metering.practice_for_key(key) is None


async def test_reserve_places_a_hold_of_the_estimate(
    metering: MeteringStore, practice: str
) -> None:
    """An admitted request holds its estimate, and the hold counts against availability."""
    first = await metering.reserve(practice, request_id="r1", estimate_micros=3 * USD)
    assert first.admitted and first.hold is not None
    assert first.hold.amount_micros == 3 * USD
    assert first.state.snapshot.budget_micros == 20 * USD
    state = await metering.state(practice)
    assert state.snapshot.held_micros == 3 * USD
    assert state.snapshot.available_micros == 17 * USD


async def test_hold_is_capped_at_what_is_available(metering: MeteringStore, practice: str) -> None:
    """Near an empty budget the last request is admitted with a hold of the remainder."""
    await spend(metering, practice, 19 * USD, "pre")
    res = await metering.reserve(practice, request_id="r1", estimate_micros=5 * USD)
    assert res.hold is not None and res.hold.amount_micros == 1 * USD
    blocked = await metering.reserve(practice, request_id="r2", estimate_micros=5 * USD)
    assert not blocked.admitted
    assert blocked.state.snapshot.available_micros == 0


async def test_license_problems_block_with_their_reason(metering: MeteringStore) -> None:
    """Missing, inactive and expired licenses each come back as their own problem."""
    now = int(time.time())
    missing = await metering.reserve("nobody", request_id="r0", estimate_micros=1)
    assert missing.state.problem is LicenseProblem.MISSING and not missing.admitted
    await metering.upsert_license(
        subscription_id="sub_cancel",
        practice_id="p_cancel",
        lookup_key="aza_basic_monthly",
        status="canceled",
        period_start=now - 10,
        period_end=now + 1000,
    )
    inactive = await metering.reserve("p_cancel", request_id="r1", estimate_micros=1)
    assert inactive.state.problem is LicenseProblem.INACTIVE
    await metering.upsert_license(
        subscription_id="sub_old",
        practice_id="p_old",
        lookup_key="aza_basic_monthly",
        status="active",
        period_start=now - 40 * 86_400,
        period_end=now - 10 * 86_400,
    )
    expired = await metering.reserve("p_old", request_id="r2", estimate_micros=1)
    assert expired.state.problem is LicenseProblem.EXPIRED


async def test_settle_writes_one_event_and_replaces_the_hold(
    metering: MeteringStore, practice: str, db: AnyDatabase
) -> None:
    """Settling deletes the hold and writes the usage event; a second settle is a no-op."""
    res = await metering.reserve(practice, request_id="req-1", estimate_micros=2 * USD)
    assert res.hold is not None
    done = await metering.settle(res.hold, chat(), cost_micros=1_234, device_id="dev1")
    again = await metering.settle(res.hold, chat(), cost_micros=1_234, device_id="dev1")
    assert done.event_id is not None and again.event_id is None
    assert done.state is not None and done.state.snapshot.used_micros == 1_234
    assert done.state.snapshot.held_micros == 0
    async with db.read() as conn:
        rows = await conn.fetchall(
            "SELECT request_id, device_id, estimated_cost_micro_usd, estimated_cost_usd, "
            "subscription_id FROM ai_usage_events"
        )
    assert len(rows) == 1
    assert rows[0]["device_id"] == "dev1" and rows[0]["subscription_id"] == "sub_top"
    assert float(rows[0]["estimated_cost_usd"]) == 0.001234
    assert await metering.active_holds() == 0
    assert list(await metering.totals_mismatches()) == []


async def test_release_drops_the_hold_once(metering: MeteringStore, practice: str) -> None:
    """Releasing frees the budget; releasing again reports nothing was there."""
    res = await metering.reserve(practice, request_id="r", estimate_micros=USD)
    assert res.hold is not None
    assert await metering.release(res.hold) is True
    assert await metering.release(res.hold) is False
    assert (await metering.state(practice)).snapshot.held_micros == 0


async def test_expired_holds_do_not_count_and_are_swept(
    db: AnyDatabase, plans: PlanBook, practice: str
) -> None:
    """A hold past its expiry stops pinning the budget and the sweep deletes only it."""
    clock = [time.time()]
    store = MeteringStore(db, plans=plans, hold_ttl_seconds=60, clock=lambda: clock[0])
    old = await store.reserve(practice, request_id="old", estimate_micros=5 * USD)
    clock[0] += 61
    fresh = await store.reserve(practice, request_id="new", estimate_micros=2 * USD)
    assert old.hold is not None and fresh.hold is not None
    assert (await store.state(practice)).snapshot.held_micros == 2 * USD
    assert await store.sweep_expired_holds() == 1
    assert await store.active_holds(practice) == 1
    # Usage is never lost: the swept request still settles into an event.
    late = await store.settle(old.hold, chat(), cost_micros=500, device_id=None)
    assert late.event_id is not None


async def test_monthly_budget_is_charged_first_then_credit(
    metering: MeteringStore, practice: str, db: AnyDatabase
) -> None:
    """A cost that crosses the end of the budget splits: budget part first, rest to credit."""
    await add_credit(db, practice, 10 * USD)
    await spend(metering, practice, 19 * USD, "pre")
    res = await metering.reserve(practice, request_id="r", estimate_micros=3 * USD)
    assert res.hold is not None
    done = await metering.settle(res.hold, chat(), cost_micros=3 * USD, device_id=None)
    assert (done.charged_budget_micros, done.charged_credit_micros) == (1 * USD, 2 * USD)
    assert done.state is not None
    assert done.state.snapshot.remaining_micros == 0
    assert done.state.snapshot.extra_credit_micros == 8 * USD


async def test_extra_credit_admits_when_monthly_budget_is_exhausted(
    metering: MeteringStore, practice: str, db: AnyDatabase
) -> None:
    """Seed: with the month used up, extra credit still lets requests through."""
    await add_credit(db, practice, 20 * USD)
    await spend(metering, practice, 20 * USD, "u1")
    state = await metering.state(practice)
    assert state.snapshot.remaining_micros == 0
    assert state.snapshot.extra_credit_micros == 20 * USD
    assert (await metering.reserve(practice, request_id="r", estimate_micros=USD)).admitted


async def test_pending_and_failed_ledger_rows_are_not_credit(
    metering: MeteringStore, practice: str, db: AnyDatabase
) -> None:
    """Only succeeded ledger entries count as extra credit."""
    await add_credit(db, practice, 5 * USD, status="pending")
    await add_credit(db, practice, 0, status="failed")
    assert (await metering.state(practice)).snapshot.extra_credit_micros == 0


async def test_new_period_starts_unused_and_credit_carries_over(
    db: AnyDatabase, plans: PlanBook
) -> None:
    """Seed: after rollover used is 0 and extra credit is untouched."""
    clock = [1_700_000_000.0]
    store = MeteringStore(db, plans=plans, clock=lambda: clock[0])
    start, end = 1_700_000_000 - 100, 1_700_000_000 + 30 * 86_400
    lic = License(
        subscription_id="manual_x",
        practice_id="p",
        status="active",
        lookup_key="aza_basic_monthly",
        customer_id=None,
        customer_email=None,
        period_start=start,
        period_end=end,
    )
    await store.upsert_license(
        subscription_id=lic.subscription_id,
        practice_id="p",
        lookup_key=lic.lookup_key,
        period_start=start,
        period_end=end,
    )
    await add_credit(db, "p", 15 * USD)
    await store.record_usage(lic, Period(start, end), chat(), cost_micros=25 * USD, request_id="a")
    before = await store.state("p")
    assert before.snapshot.used_micros == 25 * USD
    assert before.snapshot.extra_credit_micros == 10 * USD
    clock[0] = end + 3600  # a manual license rolls into the next calendar month
    after = await store.state("p")
    assert after.period is not None and after.period.start >= end
    assert after.snapshot.used_micros == 0
    assert after.snapshot.extra_credit_micros == 10 * USD


async def test_concurrent_burst_cannot_overspend(metering: MeteringStore, practice: str) -> None:
    """60 concurrent reservations on 3.5 USD left: ceil(3.5/1) admitted, never more."""
    await spend(metering, practice, int(16.5 * USD), "pre")
    estimate = 1 * USD
    results = await asyncio.gather(
        *(
            metering.reserve(practice, request_id=f"r{i}", estimate_micros=estimate)
            for i in range(60)
        )
    )
    holds = [r.hold for r in results if r.hold is not None]
    assert len(holds) == 4
    assert sum(h.amount_micros for h in holds) == int(3.5 * USD)
    await asyncio.gather(
        *(metering.settle(h, chat(), cost_micros=estimate, device_id=None) for h in holds)
    )
    state = await metering.state(practice)
    overspend = state.snapshot.used_micros - 20 * USD
    estimation_error = sum(estimate - h.amount_micros for h in holds)
    assert 0 <= overspend <= estimation_error
    assert await metering.active_holds() == 0
    assert list(await metering.totals_mismatches()) == []


async def test_vacuum_reclaims_the_rows_of_deleted_holds(
    metering: MeteringStore, practice: str, db: AnyDatabase
) -> None:
    """Each request leaves a dead hold row on PostgreSQL; the gateway's own vacuum clears them."""
    for n in range(200):
        reservation = await metering.reserve(practice, request_id=f"vac{n}", estimate_micros=10)
        assert reservation.hold is not None
        assert await metering.release(reservation.hold)
    if db.dialect != "postgresql":
        assert await metering.vacuum_holds() is False  # SQLite reuses the space itself
        return

    async def pages() -> int:
        async with db.read() as conn:
            size = await conn.fetchval("SELECT pg_relation_size('ai_budget_holds')")
        return int(size) // 8192

    assert await pages() > 0  # 200 dead rows, no live one
    # VACUUM keeps rows an older snapshot may still see: another session's
    # open transaction on this database (a neighbour test's) delays the
    # reclaim, so it is asked again until that transaction ends.
    deadline = time.monotonic() + 30
    while True:
        assert await metering.vacuum_holds() is True
        if await pages() == 0:  # reclaimed, and the empty pages given back
            break
        assert time.monotonic() < deadline, "dead hold rows never reclaimed"
        await asyncio.sleep(0.1)
    assert await metering.active_holds() == 0
