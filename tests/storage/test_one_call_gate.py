"""PostgreSQL: the gate and the settle as one statement each (`aza_reserve`, `aza_settle`).

The single calls must decide exactly what the transactions decide: the same
admissions, hold amounts, budget/credit splits and states, with no hold left
behind when the Python rules overrule the call (a new period, an expired or
changed license).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from budget.license import LicenseProblem
from budget.operations import Operation
from budget.pricing import PlanBook
from budget.usage import Usage
from config import CONFIG_DIR
from credit.ledger import extra_credit_micros
from credit.money_sql import MONEY_COLUMNS
from gateway.storage import AnyDatabase, open_database
from gateway.storage.metering import MeteringStore
from gateway.storage.postgres import PostgresDatabase
from tests.conftest import create_schema, drop_schema, pg_url_with_schema, skip_without_postgres

pytestmark = pytest.mark.postgres

USD = 1_000_000
DAY = 86_400
START = 1_790_000_000  # a fixed "now" for the clocks below


def chat() -> Usage:
    return Usage(operation=Operation.CHAT, model="gpt-4o-mini", input_tokens=10, output_tokens=5)


@dataclass
class Clock:
    now: float = float(START)

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def engine() -> AsyncIterator[PostgresDatabase]:
    skip_without_postgres()
    schema = "t_" + uuid.uuid4().hex[:16]
    await create_schema(schema)
    db = await open_database(pg_url_with_schema(schema), pool_size=10)
    assert isinstance(db, PostgresDatabase)
    try:
        yield db
    finally:
        await db.close()
        await drop_schema(schema)


def store_on(
    db: PostgresDatabase, clock: Callable[[], float], *, one_call: bool = True
) -> MeteringStore:
    return MeteringStore(
        db, plans=PlanBook.load(CONFIG_DIR / "plans.toml"), clock=clock, one_call=one_call
    )


async def license_for(
    store: MeteringStore,
    *,
    subscription_id: str = "sub_p",
    lookup_key: str = "aza_basic_monthly",  # 20 USD a month
    start: int = START - DAY,
    end: int = START + 29 * DAY,
    status: str = "active",
    practice_id: str = "p",
) -> None:
    await store.upsert_license(
        subscription_id=subscription_id,
        practice_id=practice_id,
        lookup_key=lookup_key,
        status=status,
        period_start=start,
        period_end=end,
    )


async def add_credit(db: PostgresDatabase, micros: int) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            "INSERT INTO ai_credit_ledger (practice_id, event_type, status, "
            "amount_internal_micro_usd, created_at, updated_at) "
            "VALUES ('p', 'topup_purchase', 'succeeded', ?, 0, 0)",
            micros,
        )


async def holds(db: PostgresDatabase) -> int:
    async with db.read() as conn:
        return int(await conn.fetchval("SELECT COUNT(*) FROM ai_budget_holds"))


async def script(db: PostgresDatabase, *, one_call: bool, seed: int) -> list[object]:
    """A random month of requests, credit and failures; everything the store answered."""
    rng = random.Random(seed)
    clock = Clock()
    store = store_on(db, clock, one_call=one_call)
    await license_for(store)
    seen: list[object] = []
    open_holds = []
    for step in range(120):
        clock.now += rng.randint(0, 3_000)
        roll = rng.random()
        if roll < 0.05:
            micros = rng.choice([1, USD, 3 * USD])
            await add_credit(db, micros)
            seen.append(("credit", micros))
            continue
        if roll < 0.15 and open_holds:
            hold = open_holds.pop(rng.randrange(len(open_holds)))
            seen.append(("release", await store.release(hold)))
            continue
        if roll < 0.55 and open_holds:
            hold = open_holds.pop(rng.randrange(len(open_holds)))
            cost = rng.choice([0, 1, hold.amount_micros, rng.randint(1, 2 * USD)])
            done = await store.settle(hold, chat(), cost_micros=cost, device_id=None)
            seen.append(
                (
                    "settle",
                    done.event_id is not None,
                    done.charged_budget_micros,
                    done.charged_credit_micros,
                    done.state.snapshot if done.state else None,
                )
            )
            continue
        estimate = rng.choice([0, 1, USD // 10, USD, 5 * USD, 30 * USD])
        res = await store.reserve("p", request_id=f"r{step}", estimate_micros=estimate)
        seen.append(
            (
                "reserve",
                res.hold.amount_micros if res.hold else None,
                res.state.snapshot,
                res.state.period,
                res.state.problem,
            )
        )
        if res.hold is not None:
            open_holds.append(res.hold)
    for hold in open_holds:
        await store.settle(hold, chat(), cost_micros=hold.amount_micros, device_id=None)
    state = await store.state("p")
    seen.append(("end", state.snapshot, await holds(db)))
    if one_call:
        # Most gates were single calls; without them this test would prove nothing.
        assert store.one_call.counts["answered"] > 20
    else:
        assert store.one_call is None
    assert list(await store.totals_mismatches()) == []
    return seen


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_single_calls_decide_exactly_what_transactions_decide(seed: int) -> None:
    async with engine() as by_transactions, engine() as by_calls:
        expected = await script(by_transactions, one_call=False, seed=seed)
        got = await script(by_calls, one_call=True, seed=seed)
    assert got == expected
    # The scripts reach every kind of outcome.
    kinds = {(entry[0], entry[1] is None) for entry in expected if entry[0] == "reserve"}
    assert kinds == {("reserve", True), ("reserve", False)}
    splits = [entry for entry in expected if entry[0] == "settle" and entry[2] and entry[3]]
    assert splits, "no settle crossed from the monthly budget into credit"


async def test_a_new_month_is_not_charged_to_the_old_one() -> None:
    """A manual license's period ends: the call defers, the gate reads the new month."""
    async with engine() as db:
        clock = Clock()
        store = store_on(db, clock)
        await license_for(store, subscription_id="manual_p", end=START + DAY)
        first = await store.reserve("p", request_id="a", estimate_micros=20 * USD)
        assert first.hold is not None
        await store.settle(first.hold, chat(), cost_micros=20 * USD, device_id=None)
        blocked = await store.reserve("p", request_id="b", estimate_micros=USD)
        assert blocked.hold is None and store.one_call.counts == {"answered": 1}
        clock.now = START + 2 * DAY  # the license's own period is over
        again = await store.reserve("p", request_id="c", estimate_micros=USD)
        assert again.hold is not None
        assert again.state.period is not None and again.state.period != first.hold.period
        assert again.state.snapshot.used_micros == 0
        assert store.one_call.counts == {"answered": 1, "deferred": 1}
        assert await holds(db) == 1


async def test_an_expired_license_gets_no_hold_from_the_call() -> None:
    """The call still matches the license row, but the Python rules say it has expired."""
    async with engine() as db:
        clock = Clock()
        store = store_on(db, clock)
        await license_for(store, end=START + DAY)
        ok = await store.reserve("p", request_id="a", estimate_micros=USD)
        assert ok.hold is not None
        await store.release(ok.hold)
        clock.now = START + DAY + store.period_grace_seconds + 1
        late = await store.reserve("p", request_id="b", estimate_micros=USD)
        assert late.hold is None
        assert late.state.problem is LicenseProblem.EXPIRED
        assert store.one_call.counts == {"deferred": 1}
        assert await holds(db) == 0


async def test_a_changed_plan_applies_at_the_next_gate() -> None:
    """An upgrade changes the license row: the call defers and the new budget counts."""
    async with engine() as db:
        clock = Clock()
        store = store_on(db, clock)
        await license_for(store)
        first = await store.reserve("p", request_id="a", estimate_micros=20 * USD)
        assert first.hold is not None and first.hold.budget_micros == 20 * USD
        await store.settle(first.hold, chat(), cost_micros=20 * USD, device_id=None)
        assert (await store.reserve("p", request_id="b", estimate_micros=USD)).hold is None
        await license_for(store, lookup_key="aza_team_monthly")
        upgraded = await store.reserve("p", request_id="c", estimate_micros=USD)
        assert upgraded.hold is not None
        assert upgraded.hold.budget_micros > 20 * USD
        assert store.one_call.counts == {"answered": 1, "deferred": 1}


async def test_a_second_settle_of_a_request_charges_nothing() -> None:
    async with engine() as db:
        store = store_on(db, Clock())
        await license_for(store)
        await store.reserve("p", request_id="warm", estimate_micros=0)
        res = await store.reserve("p", request_id="a", estimate_micros=USD)
        assert res.hold is not None and store.one_call.counts == {"answered": 1}
        once = await store.settle(res.hold, chat(), cost_micros=USD, device_id=None)
        twice = await store.settle(res.hold, chat(), cost_micros=USD, device_id=None)
        assert once.event_id is not None and twice.event_id is None
        assert (twice.charged_budget_micros, twice.charged_credit_micros) == (0, 0)
        assert (await store.state("p")).snapshot.used_micros == USD
        assert list(await store.totals_mismatches()) == []


async def test_two_instances_racing_admit_exactly_the_budget() -> None:
    """Two stores (two gateway processes) on one practice: 20 USD admit 20 holds of 1 USD."""
    async with engine() as db:
        clock = Clock()
        one, other = store_on(db, clock), store_on(db, clock)
        await license_for(one)
        for store in (one, other):  # each learns the license with a first gate
            warm = await store.reserve("p", request_id=f"w{id(store)}", estimate_micros=0)
            assert warm.hold is not None
            await store.release(warm.hold)
        results = await asyncio.gather(
            *(
                (one if i % 2 else other).reserve("p", request_id=f"r{i}", estimate_micros=USD)
                for i in range(60)
            )
        )
        admitted = [r.hold for r in results if r.hold is not None]
        assert len(admitted) == 20 and all(h.amount_micros == USD for h in admitted)
        assert one.one_call.counts["answered"] + other.one_call.counts["answered"] == 60
        assert await holds(db) == 20


async def test_a_lone_gate_leaves_its_connection_durable() -> None:
    """The lone reserve skips the WAL flush for its own transaction only."""
    async with engine() as db:
        small = await open_database(db.dsn, pool_size=1)
        assert isinstance(small, PostgresDatabase)
        try:
            store = store_on(small, Clock())
            await license_for(store)
            for request_id in ("a", "b", "c"):
                res = await store.reserve("p", request_id=request_id, estimate_micros=USD)
                assert res.hold is not None
            assert store.one_call.counts == {"answered": 2}
            async with small.read() as conn:
                assert await conn.fetchval("SHOW synchronous_commit") == "on"
        finally:
            await small.close()


async def test_settles_batched_together_split_budget_then_credit_in_order() -> None:
    """25 settles of 1 USD at once on 20 USD of budget and 10 of credit: 20 + 5, exactly."""
    async with engine() as db:
        store = store_on(db, Clock())
        await license_for(store)
        await add_credit(db, 10 * USD)
        await store.reserve("p", request_id="warm", estimate_micros=0)
        reservations = await asyncio.gather(
            *(store.reserve("p", request_id=f"r{i}", estimate_micros=USD) for i in range(25))
        )
        holds = [r.hold for r in reservations if r.hold is not None]
        assert len(holds) == 25
        done = await asyncio.gather(
            *(store.settle(h, chat(), cost_micros=USD, device_id=None) for h in holds)
        )
        assert store.one_call.settles.batches > 0  # they did meet
        assert sum(d.charged_budget_micros for d in done) == 20 * USD
        assert sum(d.charged_credit_micros for d in done) == 5 * USD
        state = await store.state("p")
        assert state.snapshot.used_micros == 25 * USD
        assert state.snapshot.extra_credit_micros == 5 * USD
        assert list(await store.totals_mismatches()) == []


async def test_each_call_of_a_batch_keeps_its_own_arguments_and_answer() -> None:
    """Gates and settles that go as one batch: every hold and event is the caller's own."""
    async with engine() as db:
        store = store_on(db, Clock())
        await license_for(store)
        await store.reserve("p", request_id="warm", estimate_micros=0)
        estimates = {f"r{i}": (i + 1) * 1_000 for i in range(12)}
        reservations = await asyncio.gather(
            *(store.reserve("p", request_id=r, estimate_micros=e) for r, e in estimates.items())
        )
        assert store.one_call.gates.batches > 0 and store.one_call.counts["deferred"] == 0
        holds = [r.hold for r in reservations if r.hold is not None]
        assert {h.request_id: h.amount_micros for h in holds} == estimates
        async with db.read() as conn:
            rows = await conn.fetchall(
                "SELECT request_id, amount_micro_usd FROM ai_budget_holds "
                "WHERE request_id <> 'warm'"
            )
        assert {row["request_id"]: row["amount_micro_usd"] for row in rows} == estimates
        costs = {h.request_id: 7 * h.amount_micros + 3 for h in holds}
        done = await asyncio.gather(
            *(
                store.settle(h, chat(), cost_micros=costs[h.request_id], device_id=h.request_id)
                for h in holds
            )
        )
        assert store.one_call.settles.batches > 0
        assert [d.cost_micros for d in done] == [costs[h.request_id] for h in holds]
        assert all(d.charged_budget_micros == d.cost_micros for d in done)
        async with db.read() as conn:
            events = await conn.fetchall(
                "SELECT request_id, device_id, estimated_cost_micro_usd, hold_micro_usd "
                "FROM ai_usage_events WHERE request_id <> 'warm'"
            )
        assert {e["request_id"]: e["estimated_cost_micro_usd"] for e in events} == costs
        assert all(e["device_id"] == e["request_id"] for e in events)
        assert {e["request_id"]: e["hold_micro_usd"] for e in events} == estimates
        assert await holds_left(db) == 0


async def holds_left(db: PostgresDatabase) -> int:
    async with db.read() as conn:
        return int(
            await conn.fetchval("SELECT COUNT(*) FROM ai_budget_holds WHERE request_id <> 'warm'")
        )


async def test_gates_racing_settles_never_admit_past_the_budget() -> None:
    """Gates do not wait for settles, yet see each settle whole: exactly 20 of 1 USD fit.

    Every request costs exactly its hold, so settling never changes what is
    available; a gate that saw a settle's usage without its hold gone (or the
    hold gone without the usage) would admit a 21st request.
    """
    async with engine() as db:
        clock = Clock()
        one, other = store_on(db, clock), store_on(db, clock)
        await license_for(one)
        for store in (one, other):
            warm = await store.reserve("p", request_id=f"w{id(store)}", estimate_micros=0)
            assert warm.hold is not None
            await store.settle(warm.hold, chat(), cost_micros=0, device_id=None)
        admitted: list[str] = []

        async def request(i: int) -> None:
            store = one if i % 2 else other
            res = await store.reserve("p", request_id=f"r{i}", estimate_micros=USD)
            if res.hold is None:
                return
            admitted.append(res.hold.request_id)
            await asyncio.sleep(0)
            await store.settle(res.hold, chat(), cost_micros=USD, device_id=None)

        for burst in range(3):
            await asyncio.gather(*(request(100 * burst + i) for i in range(40)))
        assert len(admitted) == 20
        state = await one.state("p")
        assert state.snapshot.used_micros == 20 * USD and state.snapshot.held_micros == 0
        assert one.one_call.counts["deferred"] == other.one_call.counts["deferred"] == 0
        assert list(await one.totals_mismatches()) == []


async def test_transaction_gates_and_single_call_gates_exclude_each_other() -> None:
    """Cold instances gate in transactions while a warm one gates in single calls."""
    async with engine() as db:
        clock = Clock()
        warm_store = store_on(db, clock)
        for round_ in range(4):
            practice = f"p{round_}"
            cold_store = store_on(db, clock)  # knows no practice: its gates are transactions
            await license_for(warm_store, subscription_id=f"sub_{practice}", practice_id=practice)
            first = await warm_store.reserve(practice, request_id=f"w{round_}", estimate_micros=0)
            assert first.hold is not None
            await warm_store.release(first.hold)
            before = warm_store.one_call.counts["answered"]
            results = await asyncio.gather(
                *(
                    (warm_store if i % 2 else cold_store).reserve(
                        practice, request_id=f"r{round_}.{i}", estimate_micros=USD
                    )
                    for i in range(60)
                )
            )
            assert sum(r.hold is not None for r in results) == 20, practice
            assert warm_store.one_call.counts["answered"] - before == 30
            assert cold_store.one_call.counts["answered"] < 30  # some went the transaction way
        assert await holds(db) == 80


async def random_money_rows(
    dbs: list[AnyDatabase], rng: random.Random, practices: list[str], periods: list[int]
) -> tuple[list[tuple[str, str, int]], list[tuple[str, int, int, int]], list[tuple[str, int, int]]]:
    """The same random ledger entries, period totals and holds, written to each of `dbs`
    (always a refund, credit not succeeded, a hold expired and one expiring at START)."""
    ledger = [(practices[0], "succeeded", -USD), (practices[0], "pending", USD)] + [
        (
            rng.choice(practices),
            rng.choice(["succeeded", "succeeded", "pending", "failed"]),
            rng.choice([-1, 1, USD, 3 * USD, rng.randint(-2 * USD, 40 * USD)]),
        )
        for _ in range(rng.randint(0, 25))
    ]
    totals = [
        (practice, period, rng.randint(0, 30 * USD), rng.choice([0, 1, rng.randint(0, 9 * USD)]))
        for practice in practices
        for period in periods
        if rng.random() < 0.7
    ]
    holds = [(practices[1], USD, START - 1), (practices[2], 7, START)] + [
        (rng.choice(practices), rng.randint(0, 5 * USD), START + rng.randint(-600, 600))
        for _ in range(rng.randint(0, 20))
    ]
    for db in dbs:
        async with db.transaction() as conn:
            for practice, status, micros in ledger:
                await conn.execute(
                    "INSERT INTO ai_credit_ledger (practice_id, event_type, status, "
                    "amount_internal_micro_usd, created_at, updated_at) "
                    "VALUES (?, 'topup_purchase', ?, ?, 0, 0)",
                    practice,
                    status,
                    micros,
                )
            for practice, period, used, credit_used in totals:
                await conn.execute(
                    "INSERT INTO ai_usage_period_totals (practice_id, period_start, "
                    "used_micro_usd, used_credit_micro_usd, events) VALUES (?, ?, ?, ?, 1)",
                    practice,
                    period,
                    used,
                    credit_used,
                )
            for n, (practice, micros, expires_at) in enumerate(holds):
                await conn.execute(
                    "INSERT INTO ai_budget_holds (hold_id, practice_id, request_id, "
                    "amount_micro_usd, created_at, expires_at) VALUES (?, ?, ?, ?, 0, ?)",
                    f"h{n}",
                    practice,
                    f"r{n}",
                    micros,
                    expires_at,
                )
    return ledger, totals, holds


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
async def test_aza_money_and_the_money_sql_sum_what_the_rows_say(seed: int, tmp_path: Path) -> None:
    """The money SQL exists once per language: `aza_money` (what runs inside PostgreSQL:
    the gate and settle functions, the credit alert trigger) and credit/money_sql.py (the
    engine-neutral code on both engines, SQLite's credit alert trigger). On random rows of
    several practices, periods and hold expiries both give the sums the rows say."""
    rng = random.Random(seed)
    practices, periods = ["p", "q", "r"], [START - 30 * DAY, START]
    sqlite = await open_database(f"sqlite:///{tmp_path / 'money.sqlite'}")
    try:
        async with engine() as pg:
            ledger, totals, holds = await random_money_rows([pg, sqlite], rng, practices, periods)
            for practice in [*practices, "nobody"]:
                credited = sum(m for p, s, m in ledger if p == practice and s == "succeeded")
                credit_used = sum(c for p, _, _, c in totals if p == practice)
                for period in [*periods, START + 30 * DAY]:
                    used = sum(u for p, s, u, _ in totals if p == practice and s == period)
                    for now in (START - 601, START, START + 601):
                        held = sum(m for p, m, e in holds if p == practice and e > now)
                        expected = (used, credited, credit_used, held)
                        async with pg.read() as conn:
                            row = await conn.fetchone(
                                "SELECT * FROM aza_money(?, ?, ?)", practice, period, now
                            )
                            assert row is not None
                            assert tuple(int(row[k]) for k in range(4)) == expected
                        for db in (pg, sqlite):
                            async with db.read() as conn:
                                row = await conn.fetchone(
                                    f"SELECT {MONEY_COLUMNS}",
                                    practice,
                                    period,
                                    practice,
                                    practice,
                                    practice,
                                    now,
                                )
                                assert row is not None
                                names = ("used", "credited", "credit_used", "held")
                                assert tuple(int(row[k]) for k in names) == expected, db.dialect
                for db in (pg, sqlite):
                    async with db.read() as conn:
                        left = await extra_credit_micros(conn, practice)
                    assert left == credited - credit_used, db.dialect
    finally:
        await sqlite.close()
