"""The metering store: keys, licenses, the budget gate, settle and upkeep on one engine.

A thin facade the gateway (middleware, routes, CLI, demo) holds as one
object; each concern lives in its own module:

- `keys` — gateway keys (hashed), `credit.licenses` — the licenses table;
- `budget_state` — license, period and money read in one query;
- `gate` — the gate's contract and the transaction gate, `one_call` — the
  PostgreSQL one-statement gate, `leases` — leasing, a wrapper over either;
- `holds` — holds and their SQL, `settle` — usage events and period totals;
- `upkeep` — sweeping, vacuuming, checking the totals.

Every operation that reads the budget and then writes against it runs
atomically per practice (a transaction locked on it, or a database function
taking the same kind of lock), so the check-then-hold step cannot be raced,
in one process or across several. Amounts are integer micro-USD throughout.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping

from budget.license import License, Period
from budget.pricing import PlanBook
from budget.snapshot import BudgetSnapshot
from budget.usage import Usage
from credit.licenses import LicenseWrite, write_license
from credit.ports import Connection
from gateway.storage.budget_state import BudgetState, StateReader
from gateway.storage.engine import MeteringEngine
from gateway.storage.gate import Gate, TransactionGate
from gateway.storage.holds import Hold, HoldIds, Reservation, Settlement, until_written
from gateway.storage.keys import KeyStore
from gateway.storage.leases import LeasingGate
from gateway.storage.one_call import OneCallGate
from gateway.storage.renewal import RunningHolds
from gateway.storage.settle import Charge, Written, record_usage, settlement
from gateway.storage.upkeep import Upkeep

_NO_LEASES: Mapping[str, int] = Counter()


class MeteringStore:
    """Keys, licenses, holds and usage on one engine; the gate strategy chosen here, once.

    `one_call`: gate and settle by database function where the engine has them
    (PostgreSQL), else in transactions. `lease_requests` of 2 or more: budget
    leases of that many estimates (`gateway.storage.leases`), else none.
    """

    def __init__(
        self,
        db: MeteringEngine,
        *,
        plans: PlanBook,
        hold_ttl_seconds: int = 900,
        period_grace_seconds: int = 172_800,
        clock: Callable[[], float] = time.time,
        retry_seconds: float = 900.0,
        one_call: bool = True,
        lease_requests: int = 0,
        lease_seconds: float = 1.0,
    ) -> None:
        self.db = db
        self.plans = plans
        self.period_grace_seconds = period_grace_seconds
        self.retry_seconds = retry_seconds
        self._clock = clock
        one_call = one_call and db.has_gate_functions
        self.states = StateReader(
            plans, period_grace_seconds=period_grace_seconds, remember=one_call
        )
        ids = HoldIds()
        self.one_call = (
            OneCallGate(
                db, self.states, ids, hold_ttl_seconds=hold_ttl_seconds, retry_seconds=retry_seconds
            )
            if one_call
            else None
        )
        base: Gate = self.one_call or TransactionGate(
            db, self.states, ids, hold_ttl_seconds=hold_ttl_seconds, retry_seconds=retry_seconds
        )
        self.leases = (
            LeasingGate(
                base,
                db,
                lease_requests=lease_requests,
                lease_seconds=lease_seconds,
                period_grace_seconds=period_grace_seconds,
                retry_seconds=retry_seconds,
                lease_request_id=f"lease:{ids.prefix}",
                clock=clock,
            )
            if lease_requests > 1
            else None
        )
        self.gate: Gate = self.leases or base
        # The gate without leases: holds of their own (a batch's, kept for hours).
        self._own_holds: Gate = base
        self.keys = KeyStore(db, clock=clock)
        self.upkeep = Upkeep(db, clock=clock)
        # Holds of requests still running, renewed before they expire.
        self.running = RunningHolds(db, hold_ttl_seconds=hold_ttl_seconds, clock=clock)
        # The keys' and upkeep's operations, as the store's own: callers hold one object.
        self.create_key = self.keys.create_key
        self.set_key_role = self.keys.set_key_role
        self.revoke_key = self.keys.revoke_key
        self.identify_key = self.keys.identify_key
        self.identify_key_hash = self.keys.identify_key_hash
        self.practice_for_key = self.keys.practice_for_key
        self.list_keys = self.keys.list_keys
        self.practices_of_prefix = self.keys.practices_of_prefix
        self.sweep_expired_holds = self.upkeep.sweep_expired_holds
        self.vacuum_holds = self.upkeep.vacuum_holds
        self.active_holds = self.upkeep.active_holds
        self.totals_mismatches = self.upkeep.totals_mismatches

    def now(self) -> int:
        return int(self._clock())

    @property
    def lease_counts(self) -> Mapping[str, int]:
        """Leases placed and closed, requests admitted on one (read by /metrics)."""
        return self.leases.counts if self.leases is not None else _NO_LEASES

    # -- licenses -----------------------------------------------------------

    async def upsert_license(
        self,
        *,
        subscription_id: str,
        practice_id: str,
        lookup_key: str,
        status: str = "active",
        period_start: int,
        period_end: int,
        customer_id: str | None = None,
        customer_email: str | None = None,
        conn: Connection | None = None,
    ) -> None:
        """Create or update a license row (keyed by subscription id), as the admin writes it."""
        write = LicenseWrite(
            subscription_id=subscription_id,
            practice_id=practice_id,
            status=status,
            lookup_key=lookup_key,
            period_start=period_start,
            period_end=period_end,
            customer_id=customer_id,
            customer_email=customer_email,
        )
        # This store's leases were placed under the old license.
        self.gate.close_leases(practice_id)
        if conn is not None:
            await write_license(conn, write, now=self.now())
            return
        async with self.db.transaction(lock=practice_id) as tx:
            await write_license(tx, write, now=self.now())

    # -- the gate -----------------------------------------------------------

    async def state(self, practice_id: str) -> BudgetState:
        """License, period and budget snapshot of a practice now (no lock, no hold)."""
        async with self.db.read() as conn:
            return await self.states.read(conn, practice_id, self.now())

    async def reserve(
        self, practice_id: str, *, request_id: str, estimate_micros: int
    ) -> Reservation:
        """Check the budget and, when it admits the request, place its hold; atomically."""
        return await self.gate.reserve(
            practice_id, request_id=request_id, estimate_micros=estimate_micros, now=self.now()
        )

    async def reserve_own(
        self, practice_id: str, *, request_id: str, estimate_micros: int, expires_at: int
    ) -> Reservation:
        """Like `reserve`, but a hold row of its own (never a lease's share) that lasts
        until `expires_at` (unix seconds), and only of the whole estimate: a batch's.

        The gate admits a request while anything is available, holding what is
        left when that is less than its estimate; a batch must be affordable
        whole, so such a partial hold is taken back and the batch refused.
        """
        reservation = await self._own_holds.reserve(
            practice_id,
            request_id=request_id,
            estimate_micros=estimate_micros,
            now=self.now(),
            expires_at=expires_at,
        )
        hold = reservation.hold
        if hold is not None and hold.amount_micros < estimate_micros:
            await self._own_holds.release(hold)
            return Reservation(hold=None, state=reservation.state)
        return reservation

    async def release(self, hold: Hold) -> bool:
        """Drop a hold without charging (upstream failed). False if it was gone already."""
        return await self.gate.release(hold)

    async def settle(
        self,
        hold: Hold,
        usage: Usage,
        *,
        cost_micros: int,
        device_id: str | None,
        status: str = "success",
        started_at: int | None = None,
        with_state: bool = True,
    ) -> Settlement:
        """Replace the hold with the request's usage event, atomically (`gateway.storage.settle`).

        Retried while the database is unreachable; a second settle of the
        same request is a no-op.
        """
        now = self.now()
        charge = Charge(usage, cost_micros, device_id, status, started_at)

        async def attempt() -> tuple[Written, BudgetSnapshot]:
            return await self.gate.settle(hold, charge, now=now)

        written, before = await until_written(
            f"settling {hold.request_id}", attempt, self.retry_seconds
        )
        return settlement(hold, cost_micros, written, before, with_state=with_state)

    async def record_usage(
        self,
        lic: License,
        period: Period,
        usage: Usage,
        *,
        cost_micros: int,
        request_id: str,
        device_id: str | None = None,
        status: str = "success",
    ) -> Settlement:
        """Write a usage event with no hold (imports, corrections, tests)."""
        return await record_usage(
            self.db,
            lic,
            period,
            usage,
            budget_micros=self.plans.monthly_budget_micros(lic.lookup_key) or 0,
            cost_micros=cost_micros,
            request_id=request_id,
            device_id=device_id,
            status=status,
            now=self.now(),
        )

    def close_leases(self, practice_id: str | None = None) -> None:
        """Close the open leases (of one practice): its next gate asks the database."""
        self.gate.close_leases(practice_id)

    async def aclose(self, *, wait_seconds: float = 10.0) -> None:
        """Give back what open leases did not use (waiting up to `wait_seconds`)."""
        await self.gate.aclose(wait_seconds=wait_seconds)
