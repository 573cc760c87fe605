"""A batch's own hold is placed with its own expiry by the gate itself (both engines).

`MeteringStore.reserve_own` hands `expires_at` to the gate, which writes it
with the hold (PostgreSQL: in `aza_reserve`'s one call once the practice's
license is known; else in the gate's transaction), so no second transaction
moves it afterwards; a hold that would be partial is taken back.
"""

from __future__ import annotations

import time

from gateway.storage import AnyDatabase
from gateway.storage.metering import MeteringStore

USD = 1_000_000


async def test_an_own_hold_is_written_with_its_expiry(
    db: AnyDatabase, metering: MeteringStore, practice: str
) -> None:
    now = int(time.time())
    placed = []
    for n, until in enumerate((now + 90_000, now + 100_000, now + 110_000)):
        reservation = await metering.reserve_own(
            practice, request_id=f"batch-hold:{n}", estimate_micros=1_000, expires_at=until
        )
        hold = reservation.hold
        assert hold is not None and hold.amount_micros == 1_000 and hold.share is None
        async with db.read() as conn:
            stored = await conn.fetchval(
                "SELECT expires_at FROM ai_budget_holds WHERE hold_id = ?", hold.hold_id
            )
        assert int(stored) == until
        placed.append(hold)
    if metering.one_call is not None:
        # After the first gate learnt the license, the one call placed them.
        assert metering.one_call.counts["answered"] >= 1
    # More than is left: the partial hold the gate would place is taken back.
    refused = await metering.reserve_own(
        practice, request_id="batch-hold:big", estimate_micros=21 * USD, expires_at=now + 90_000
    )
    assert refused.hold is None
    assert await metering.active_holds() == 3
