"""The budget gate: one contract, and the transaction gate that every engine has.

A gate decides, atomically per practice, whether a request's estimate fits
what is left (`budget.snapshot.admit`) and places its hold; it then settles
or releases that hold. Three implementations, chosen once when the store is
built (`MeteringStore`), never per request:

- `TransactionGate` (here): a transaction locked on the practice reads the
  state and places the hold. Every engine; the fallback of the others.
- `OneCallGate` (`gateway.storage.one_call`): the gate and settle as one
  statement each, database functions batched per practice (PostgreSQL);
  defers to a transaction gate when its answer disagrees with the rules.
- `LeasingGate` (`gateway.storage.leases`): a wrapper over either, that
  asks the database for a lease (several requests' estimates) and admits
  the practice's next requests against it without a round trip.

The first two share `DatabaseGate` (what they are built with, no leases).
A settle is handed through as one `Charge` (`gateway.storage.settle`).

`reserve(..., lease_micros=n)` asks the gate to hold `n` instead of the
estimate when the practice has plenty left; `Reservation.leased` says it
did. Only the leasing gate asks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from budget.snapshot import BudgetSnapshot, admit
from gateway.storage.budget_state import StateReader
from gateway.storage.engine import MeteringEngine
from gateway.storage.holds import (
    Hold,
    HoldIds,
    Reservation,
    delete_hold,
    insert_hold,
    until_written,
)
from gateway.storage.settle import Charge, Written, settle_in_transaction


class Gate(Protocol):
    """Reserve, release and settle a practice's holds."""

    async def reserve(
        self,
        practice_id: str,
        *,
        request_id: str,
        estimate_micros: int,
        now: int,
        lease_micros: int = 0,
        expires_at: int | None = None,
    ) -> Reservation:
        """Check the budget and, when it admits the request, place its hold; atomically.

        The hold lasts `hold_ttl_seconds`, or until `expires_at` (a batch's own hold)."""
        ...

    async def release(self, hold: Hold) -> bool:
        """Drop a hold without charging, retrying while the database is away.

        False if it was gone already."""
        ...

    async def settle(
        self, hold: Hold, charge: Charge, *, now: int
    ) -> tuple[Written, BudgetSnapshot]:
        """One attempt to replace the hold with `charge`'s usage event (the caller retries).

        Returns what was written and the money read before it."""
        ...

    def close_leases(self, practice_id: str | None = None) -> None:
        """Admit nothing more on open leases (of one practice); none without leasing."""
        ...

    async def aclose(self, *, wait_seconds: float) -> None:
        """Give back what open leases did not use; nothing to do without leasing."""
        ...


class DatabaseGate:
    """What the two gates that ask the database each time share: what they are built
    with, and no leases (`LeasingGate` adds those over either)."""

    def __init__(
        self,
        db: MeteringEngine,
        states: StateReader,
        ids: HoldIds,
        *,
        hold_ttl_seconds: int,
        retry_seconds: float,
    ) -> None:
        self.db = db
        self.states = states
        self.ids = ids
        self.hold_ttl_seconds = hold_ttl_seconds
        self.retry_seconds = retry_seconds

    def close_leases(self, practice_id: str | None = None) -> None:
        """No leases here."""

    async def aclose(self, *, wait_seconds: float) -> None:
        """Nothing to give back."""


class TransactionGate(DatabaseGate):
    """The gate as a transaction locked on the practice (every engine)."""

    def __init__(
        self,
        db: MeteringEngine,
        states: StateReader,
        ids: HoldIds,
        *,
        hold_ttl_seconds: int,
        retry_seconds: float,
        also_lock: Callable[[str], str] | None = None,
    ) -> None:
        super().__init__(
            db, states, ids, hold_ttl_seconds=hold_ttl_seconds, retry_seconds=retry_seconds
        )
        # The name of a second lock to take after the practice's (the one-call
        # gate's, whose functions hold only that one).
        self._also_lock = also_lock

    async def reserve(
        self,
        practice_id: str,
        *,
        request_id: str,
        estimate_micros: int,
        now: int,
        lease_micros: int = 0,
        expires_at: int | None = None,
    ) -> Reservation:
        # Shared: the block raises only when the database fails; DatabaseUnavailable
        # (also when its group was rolled back) is a 503.
        async with self.db.transaction(lock=practice_id, shared=True) as conn:
            if self._also_lock is not None:
                # After the practice's lock: the one order every holder of both uses.
                await self.db.lock_also(conn, self._also_lock(practice_id))
            state = await self.states.read(conn, practice_id, now)
            if state.problem is not None or state.license is None or state.period is None:
                return Reservation(hold=None, state=state)
            decision = admit(state.snapshot, estimate_micros, lease_micros=lease_micros)
            if not decision.admitted:
                return Reservation(hold=None, state=state)
            hold_id = self.ids.new()
            await insert_hold(
                conn,
                hold_id=hold_id,
                practice_id=practice_id,
                request_id=request_id,
                amount_micros=decision.hold_micros,
                now=now,
                expires_at=now + self.hold_ttl_seconds if expires_at is None else expires_at,
            )
        hold = Hold(
            hold_id=hold_id,
            practice_id=practice_id,
            request_id=request_id,
            amount_micros=decision.hold_micros,
            license=state.license,
            period=state.period,
            budget_micros=state.snapshot.budget_micros,
        )
        return Reservation(hold=hold, state=state, leased=decision.leased)

    async def release(self, hold: Hold) -> bool:
        async def attempt() -> int:
            # Shared: DatabaseUnavailable (a group rolled back) is retried.
            async with self.db.transaction(lock=hold.practice_id, shared=True) as conn:
                return await delete_hold(conn, hold.practice_id, hold.hold_id)

        released = await until_written(f"releasing {hold.request_id}", attempt, self.retry_seconds)
        return released > 0

    async def settle(
        self, hold: Hold, charge: Charge, *, now: int
    ) -> tuple[Written, BudgetSnapshot]:
        return await settle_in_transaction(self.db, self.states, hold, charge, now=now)
