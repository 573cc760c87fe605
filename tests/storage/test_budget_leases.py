"""Budget leases on both engines: a gate holds several requests' estimates at once
and the store admits the next requests against that hold without the database.

What must hold: every admitted request is covered by a hold in the database
(the lease row is never smaller than the shares in flight), spending never
passes the budget because of a lease, nothing is left held once requests are
settled and leases closed, and close to an empty budget no lease is placed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from budget.operations import Operation
from budget.pricing import PlanBook
from budget.snapshot import LEASE_FLOOR_FACTOR
from budget.usage import Usage
from gateway.storage import AnyDatabase
from gateway.storage.holds import Hold
from gateway.storage.leases import MAX_LEASE_SCALE
from gateway.storage.metering import MeteringStore

USD = 1_000_000
DAY = 86_400
EST = 1_000  # a request's estimate, micro-USD
K = 8  # requests per lease in these tests


def chat() -> Usage:
    return Usage(operation=Operation.CHAT, model="gpt-4o-mini", input_tokens=10, output_tokens=5)


@dataclass
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=[True, False], ids=["one-call", "transactions"])
def one_call(request: pytest.FixtureRequest, db: AnyDatabase) -> bool:
    if not request.param and db.dialect != "postgresql":
        pytest.skip("SQLite always gates in transactions")
    return bool(request.param)


@pytest.fixture
def clock() -> Clock:
    return Clock(float(int(time.time())))


@pytest.fixture
def make_store(
    db: AnyDatabase, plans: PlanBook, one_call: bool, clock: Clock
) -> Callable[..., MeteringStore]:
    def make(*, lease_requests: int = K, lease_seconds: float = 60.0) -> MeteringStore:
        return MeteringStore(
            db,
            plans=plans,
            clock=clock,
            one_call=one_call,
            lease_requests=lease_requests,
            lease_seconds=lease_seconds,
        )

    return make


@pytest.fixture
def store(make_store: Callable[..., MeteringStore]) -> MeteringStore:
    return make_store()


async def licensed(store: MeteringStore, clock: Clock, practice_id: str = "p") -> str:
    """An active aza_basic_monthly license (20 USD) whose period runs another 29 days."""
    now = int(clock.now)
    await store.upsert_license(
        subscription_id=f"sub_{practice_id}",
        practice_id=practice_id,
        lookup_key="aza_basic_monthly",
        status="active",
        period_start=now - DAY,
        period_end=now + 29 * DAY,
        customer_id=None,
        customer_email=None,
    )
    return practice_id


async def hold_rows(db: AnyDatabase) -> dict[str, int]:
    async with db.read() as conn:
        rows = await conn.fetchall("SELECT hold_id, amount_micro_usd FROM ai_budget_holds")
    return {row["hold_id"]: int(row["amount_micro_usd"]) for row in rows}


async def events(db: AnyDatabase) -> int:
    async with db.read() as conn:
        return int(await conn.fetchval("SELECT COUNT(*) FROM ai_usage_events") or 0)


async def gate(store: MeteringStore, practice_id: str, request_id: str, est: int = EST) -> Hold:
    reservation = await store.reserve(practice_id, request_id=request_id, estimate_micros=est)
    assert reservation.hold is not None, f"{request_id} was blocked"
    return reservation.hold


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_lease_admits_the_next_requests_on_its_one_hold(
    store: MeteringStore, db: AnyDatabase, clock: Clock
) -> None:
    """The first gate holds K estimates in one row; the next K-1 requests take shares of it."""
    p = await licensed(store, clock)
    first = await gate(store, p, "r0")
    assert first.share is not None and first.amount_micros == EST
    assert await hold_rows(db) == {first.hold_id: K * EST}
    assert (await store.state(p)).snapshot.held_micros == K * EST
    rest = [await gate(store, p, f"r{i}") for i in range(1, K)]
    assert {h.hold_id for h in rest} == {first.hold_id}
    assert all(h.amount_micros == EST for h in rest)
    assert store.lease_counts["admitted"] == K - 1
    # Still the one row: none of those requests wrote a hold of its own.
    assert await hold_rows(db) == {first.hold_id: K * EST}
    await store.aclose()


async def test_each_settle_takes_its_share_off_and_the_last_one_deletes_the_row(
    store: MeteringStore, db: AnyDatabase, clock: Clock
) -> None:
    p = await licensed(store, clock)
    holds = [await gate(store, p, f"r{i}") for i in range(K)]  # the lease is used up
    lease_id = holds[0].hold_id
    for n, hold in enumerate(holds[:3], start=1):
        done = await store.settle(hold, chat(), cost_micros=700, device_id=None)
        assert done.event_id is not None
        assert (await hold_rows(db))[lease_id] == (K - n) * EST
    # Settling one again charges nothing and takes nothing off.
    again = await store.settle(holds[0], chat(), cost_micros=700, device_id=None)
    assert again.event_id is None
    assert (await hold_rows(db))[lease_id] == (K - 3) * EST
    await asyncio.gather(
        *(store.settle(h, chat(), cost_micros=700, device_id=None) for h in holds[3:])
    )
    assert lease_id not in await hold_rows(db)
    await store.aclose()  # the lease placed ahead meanwhile goes back whole
    assert await hold_rows(db) == {}
    state = await store.state(p)
    assert state.snapshot.used_micros == K * 700 and state.snapshot.held_micros == 0
    assert await events(db) == K
    assert list(await store.totals_mismatches()) == []


async def test_closing_a_lease_gives_back_what_was_never_taken(
    store: MeteringStore, db: AnyDatabase, clock: Clock
) -> None:
    p = await licensed(store, clock)
    holds = [await gate(store, p, f"r{i}") for i in range(3)]
    await store.settle(holds[0], chat(), cost_micros=EST, device_id=None)
    await store.aclose()
    # Two requests still in flight: the row covers exactly them.
    assert await hold_rows(db) == {holds[0].hold_id: 2 * EST}
    for hold in holds[1:]:
        await store.settle(hold, chat(), cost_micros=EST, device_id=None)
    assert await hold_rows(db) == {}
    # A closed lease admits nothing: the next gate asks the database again.
    again = await gate(store, p, "r9")
    assert again.hold_id != holds[0].hold_id
    await store.aclose()


async def test_release_returns_a_share_to_an_open_lease_or_to_the_database_once_closed(
    store: MeteringStore, db: AnyDatabase, clock: Clock
) -> None:
    p = await licensed(store, clock)
    holds = [await gate(store, p, f"r{i}") for i in range(K)]
    lease_id = holds[0].hold_id
    assert await store.release(holds[1]) is True
    assert await store.release(holds[1]) is False  # once only
    # The share went back into the lease: one more request fits on it.
    extra = await gate(store, p, "r-extra")
    assert extra.hold_id == lease_id
    await store.aclose()  # nothing unused left to give back
    assert await hold_rows(db) == {lease_id: K * EST}
    assert await store.release(holds[2]) is True  # closed: off the row now
    assert await hold_rows(db) == {lease_id: (K - 1) * EST}
    assert await store.release(holds[2]) is False
    for hold in [holds[0], *holds[3:], extra]:
        await store.settle(hold, chat(), cost_micros=EST, device_id=None)
    assert await hold_rows(db) == {}
    assert await events(db) == K - 1


async def test_no_lease_close_to_an_empty_budget(
    store: MeteringStore, db: AnyDatabase, clock: Clock
) -> None:
    """With less than LEASE_FLOOR_FACTOR leases available each request holds its own estimate."""
    p = await licensed(store, clock)
    budget = 20 * USD
    estimate = budget // (LEASE_FLOOR_FACTOR * K) + 1  # one lease would be over a quarter
    hold = await gate(store, p, "r0", estimate)
    assert hold.share is None and hold.amount_micros == estimate
    assert await hold_rows(db) == {hold.hold_id: estimate}
    await store.release(hold)
    # Just enough for a lease: one is placed.
    leased = await gate(store, p, "r1", budget // (LEASE_FLOOR_FACTOR * K))
    assert leased.share is not None
    await store.release(leased)
    await store.aclose()
    assert await hold_rows(db) == {}


async def test_leases_never_let_spending_pass_the_budget(
    make_store: Callable[..., MeteringStore], db: AnyDatabase, clock: Clock
) -> None:
    """Two instances with leases, three workers each, spend a budget down to exactly 0.

    Each worker admits and settles one request after another, so settled
    shares and new ones interleave on the leases. Each request costs its
    estimate: with no overspend exactly budget / estimate requests are
    admitted in all, however the leases fell.
    """
    stores = [make_store(), make_store()]
    p = await licensed(stores[0], clock)
    estimate = 50_000  # 0.05 USD: 400 requests in 20 USD
    admitted = 0

    async def worker(store: MeteringStore, name: str) -> None:
        nonlocal admitted
        for n in range(1000):
            res = await store.reserve(p, request_id=f"{name}-{n}", estimate_micros=estimate)
            if res.hold is None:
                return
            admitted += 1
            await asyncio.sleep(0)
            await store.settle(res.hold, chat(), cost_micros=estimate, device_id=None)

    await asyncio.gather(*(worker(stores[i % 2], f"w{i}") for i in range(6)))
    assert admitted <= 400
    for store in stores:
        await store.aclose()
    # A worker may have been turned away while the other instance's lease
    # still held the last money; once that is given back, it is spent too.
    await worker(stores[0], "last")
    await stores[0].aclose()
    state = await stores[0].state(p)
    assert admitted == 400 and state.snapshot.used_micros == 20 * USD
    assert sum(s.lease_counts["admitted"] for s in stores) > 100  # leases were in play
    assert await hold_rows(db) == {}
    assert list(await stores[0].totals_mismatches()) == []


async def test_a_lease_is_not_used_past_its_period(
    store: MeteringStore, db: AnyDatabase, clock: Clock
) -> None:
    """Past the period (and its grace) the database judges: the license has run out."""
    p = await licensed(store, clock)
    first = await gate(store, p, "r0")
    await store.settle(first, chat(), cost_micros=EST, device_id=None)
    # Inside the grace after current_period_end the period is still the same one.
    clock.now += 29 * DAY + 1
    assert (await gate(store, p, "r1")).hold_id == first.hold_id
    clock.now += store.period_grace_seconds
    later = await store.reserve(p, request_id="r2", estimate_micros=EST)
    assert later.hold is None and later.state.problem is not None
    assert store.lease_counts["closed"] == 1
    await store.aclose()
    assert await hold_rows(db) == {first.hold_id: EST}  # r1, still in flight


async def test_a_license_change_closes_the_practice_lease(
    store: MeteringStore, db: AnyDatabase, clock: Clock
) -> None:
    p = await licensed(store, clock)
    first = await gate(store, p, "r0")
    now = int(clock.now)
    await store.upsert_license(
        subscription_id="sub_p",
        practice_id=p,
        lookup_key="aza_basic_monthly",
        status="canceled",
        period_start=now - DAY,
        period_end=now + 29 * DAY,
        customer_id=None,
        customer_email=None,
    )
    blocked = await store.reserve(p, request_id="r1", estimate_micros=EST)
    assert blocked.hold is None and blocked.state.problem is not None
    await store.settle(first, chat(), cost_micros=EST, device_id=None)
    await store.aclose()
    assert await hold_rows(db) == {}


async def test_the_next_lease_is_placed_ahead_once_half_is_taken(
    store: MeteringStore, db: AnyDatabase, clock: Clock
) -> None:
    p = await licensed(store, clock)
    holds = [await gate(store, p, f"r{i}") for i in range(K // 2 + 1)]
    await until(lambda: store.lease_counts["placed"] == 2, "the lease placed ahead")
    ahead = set(await hold_rows(db)) - {holds[0].hold_id}
    assert len(ahead) == 1
    holds += [await gate(store, p, f"s{i}") for i in range(K // 2 - 1)]  # the first one's rest
    assert {h.hold_id for h in holds} == {holds[0].hold_id}
    nxt = await gate(store, p, "n0")
    assert {nxt.hold_id} == ahead
    for hold in [*holds, nxt]:
        await store.settle(hold, chat(), cost_micros=EST, device_id=None)
    await store.aclose()
    assert await hold_rows(db) == {}


async def test_leases_double_while_they_go_fast_up_to_the_cap(
    store: MeteringStore, db: AnyDatabase, clock: Clock
) -> None:
    """Half of each lease taken in far less than lease_seconds/8: each next one is twice as big.

    At a high request rate a lease of fixed size ran out before the next one
    was placed ahead, and a quarter of the requests at c=64 went to the
    database; growing leases keep the next one ahead in time.
    """
    p = await licensed(store, clock)
    holds = []
    for i in range(300):
        holds.append(await gate(store, p, f"r{i}"))
        await until(lambda: not store.leases._leasing, "the lease placed ahead")
    rows = await hold_rows(db)
    sizes = [rows[hold_id] // EST for hold_id in sorted(rows)]  # ids count up: placing order
    assert sizes[:6] == [K, 2 * K, 4 * K, 8 * K, 16 * K, MAX_LEASE_SCALE * K]
    assert max(sizes) == MAX_LEASE_SCALE * K
    assert sum(sizes[:-1]) < 300 <= sum(sizes)  # the last, open one holds the rest
    assert store.lease_counts["admitted"] == 300 - 1  # only the first gate asked the database
    for hold in holds:
        await store.settle(hold, chat(), cost_micros=EST, device_id=None)
    await store.aclose()
    assert await hold_rows(db) == {}
    assert list(await store.totals_mismatches()) == []


async def test_a_lease_that_expires_mostly_unused_halves_the_next(
    make_store: Callable[..., MeteringStore], db: AnyDatabase, clock: Clock
) -> None:
    store = make_store(lease_seconds=0.5)
    p = await licensed(store, clock)
    holds = [await gate(store, p, f"r{i}") for i in range(K // 2 + 1)]
    await until(lambda: store.lease_counts["placed"] == 2, "the lease placed ahead")
    ahead = set(await hold_rows(db)) - {holds[0].hold_id}
    assert [(await hold_rows(db))[h] for h in ahead] == [2 * K * EST]  # grown: half went fast
    # Both expire: the first more than half taken, the one ahead never used.
    await until(lambda: store.lease_counts["closed"] == 2, "both leases to expire")
    again = await gate(store, p, "later")
    assert (await hold_rows(db))[again.hold_id] == K * EST  # halved back
    for hold in [*holds, again]:
        await store.settle(hold, chat(), cost_micros=EST, device_id=None)
    await store.aclose()
    assert await hold_rows(db) == {}


async def test_too_little_left_for_a_lease_this_size_halves_the_next(
    store: MeteringStore, db: AnyDatabase, clock: Clock
) -> None:
    p = await licensed(store, clock)
    holds = [await gate(store, p, f"r{i}") for i in range(K // 2 + 1)]
    await until(lambda: store.lease_counts["placed"] == 2, "the lease placed ahead (2K)")
    await licensed(store, clock)  # this instance changed the license: its leases close
    await until(lambda: not store.leases._background, "the leases' rest to go back")
    assert sum((await hold_rows(db)).values()) == len(holds) * EST
    state = await store.state(p)
    assert state.license is not None and state.period is not None
    # Leave exactly 6K estimates: under the 4x floor of a 2K lease, over that of a K lease.
    await store.record_usage(
        state.license,
        state.period,
        chat(),
        cost_micros=20 * USD - len(holds) * EST - 6 * K * EST,
        request_id="earlier",
    )
    alone = await gate(store, p, "a")  # asked for 2K: too much, so only its estimate
    assert alone.share is None and (await hold_rows(db))[alone.hold_id] == EST
    leased = await gate(store, p, "b")  # asks for K now, which fits
    assert leased.share is not None and (await hold_rows(db))[leased.hold_id] == K * EST
    for hold in [*holds, alone, leased]:
        await store.settle(hold, chat(), cost_micros=EST, device_id=None)
    await store.aclose()
    assert await hold_rows(db) == {}


async def test_a_lease_closes_by_itself_after_lease_seconds(
    make_store: Callable[..., MeteringStore], db: AnyDatabase, clock: Clock
) -> None:
    store = make_store(lease_seconds=0.5)  # long enough for the checks before it closes
    p = await licensed(store, clock)
    hold = await gate(store, p, "r0")
    await store.settle(hold, chat(), cost_micros=EST, device_id=None)
    assert await hold_rows(db) == {hold.hold_id: (K - 1) * EST}
    await until(lambda: store.lease_counts["closed"] == 1, "the lease to close")
    await store.aclose()  # waits for the give-back
    assert await hold_rows(db) == {}


async def test_leases_off_every_request_holds_its_own_estimate(
    make_store: Callable[..., MeteringStore], db: AnyDatabase, clock: Clock
) -> None:
    store = make_store(lease_requests=0)
    p = await licensed(store, clock)
    holds = [await gate(store, p, f"r{i}") for i in range(3)]
    assert all(h.share is None for h in holds)
    assert await hold_rows(db) == {h.hold_id: EST for h in holds}
    assert store.lease_counts["placed"] == 0
    for hold in holds:
        await store.settle(hold, chat(), cost_micros=EST, device_id=None)
    assert await hold_rows(db) == {}


async def test_closing_the_store_waits_for_an_unreachable_database_only_so_long(
    store: MeteringStore, db: AnyDatabase, clock: Clock
) -> None:
    """A give-back that cannot reach the database does not hold up shutdown; its row expires."""
    p = await licensed(store, clock)
    hold = await gate(store, p, "r0")
    assert store.leases is not None
    store.leases.retry_seconds = 60.0
    await db.close()  # the database goes away under the store
    loop = asyncio.get_running_loop()
    started = loop.time()
    await store.aclose(wait_seconds=0.3)
    assert loop.time() - started < 5
    assert hold.share is not None and not hold.share.lease.open
