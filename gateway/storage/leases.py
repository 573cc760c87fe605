"""Budget leases: a gate wrapper that admits a practice's requests without a round trip.

When a practice has plenty left (`budget.snapshot.admit` decides), the inner
gate (transaction or one-call) places one hold for several requests'
estimates, a lease; the practice's next requests take their estimate from it
in memory while it is open and the license still gives the same period.
Once half of a lease is taken, the next one is asked for in the background,
so that requests seldom wait for the database. Each settle takes its share
off the lease's row in the database; what was never taken goes back when the
lease closes (after `lease_seconds`, when a request no longer fits, when the
license changes, or when the store closes). Leases grow while a practice
goes fast (up to `MAX_LEASE_SCALE` times `lease_requests` estimates) and
shrink when unused; the 4x floor of `admit` still bounds each to a quarter
of what is available.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from budget.license import current_period
from budget.snapshot import BudgetSnapshot
from credit.ports import Database
from gateway.storage.budget_state import BudgetState
from gateway.storage.gate import Gate
from gateway.storage.holds import Hold, Reservation, take_off_hold, until_written
from gateway.storage.settle import Charge, Written

log = logging.getLogger("aza.metering")

# A practice's leases grow up to this many times `lease_requests` estimates
# at high request rates (LeasingGate._lease_requests_for).
MAX_LEASE_SCALE = 16


@dataclass(slots=True, eq=False)
class Lease:
    """A hold of several requests' estimates that the gate admits requests against.

    `taken_micros`: the estimates of the requests admitted on it and not
    released; settled ones stay counted, since each settle took its share
    off the row in the database. When it closes, what was never taken goes
    back (`LeasingGate._close_lease`), and the row is gone with the last settle.
    """

    hold_id: str
    practice_id: str
    amount_micros: int
    taken_micros: int
    state: BudgetState
    estimate_micros: int  # the estimate it was sized for (amount = estimate x requests)
    placed_at: float = 0.0  # loop time
    open: bool = True
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True, eq=False)
class Share:
    """A request's part of a lease; `done` once settled or released."""

    lease: Lease
    done: bool = False


class LeasingGate:
    """A gate that leases budget from `inner` (see the module docstring)."""

    def __init__(
        self,
        inner: Gate,
        db: Database,
        *,
        lease_requests: int,
        lease_seconds: float,
        period_grace_seconds: int,
        retry_seconds: float,
        lease_request_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inner = inner
        self.db = db
        # A lease is `_lease_requests_for` the practice (`lease_requests` at
        # first) times the estimate of the request whose gate places it.
        self.lease_requests = lease_requests
        self.lease_seconds = lease_seconds
        self.period_grace_seconds = period_grace_seconds
        self.retry_seconds = retry_seconds
        self._lease_request_id = lease_request_id  # the request id of leases placed ahead
        self._clock = clock
        self._leases: dict[str, Lease] = {}  # the open lease requests take from
        self._next: dict[str, Lease] = {}  # the one placed ahead, taken when that runs out
        self._leasing: set[str] = set()  # practices with a gate asking for a lease
        # Requests per lease, per practice: `lease_requests` times a scale of
        # 1 to MAX_LEASE_SCALE (see _lease_requests_for).
        self._lease_scale: dict[str, int] = {}
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()
        # Leases placed and closed, requests admitted on one (/metrics reads it).
        self.counts: Counter[str] = Counter()

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
        """The practice's open lease admits the request without the database when its
        estimate fits; otherwise the inner gate decides, and places a lease when the
        practice has plenty left. A hold with its own expiry is never a lease's."""
        if expires_at is not None:
            return await self.inner.reserve(
                practice_id,
                request_id=request_id,
                estimate_micros=estimate_micros,
                now=now,
                expires_at=expires_at,
            )
        if practice_id in self._leases or practice_id in self._next:
            hold = self._from_leases(practice_id, request_id, estimate_micros, now)
            if hold is not None:
                assert hold.share is not None
                return Reservation(hold=hold, state=hold.share.lease.state)
        asked = 0
        if practice_id not in self._leasing:
            # One gate of a practice asks at a time; the others meanwhile hold
            # their own estimate, as without leases.
            asked = max(1, estimate_micros) * self._lease_requests_for(practice_id)
            self._leasing.add(practice_id)
        try:
            reservation = await self.inner.reserve(
                practice_id,
                request_id=request_id,
                estimate_micros=estimate_micros,
                now=now,
                lease_micros=asked,
            )
        finally:
            if asked:
                self._leasing.discard(practice_id)
        if not reservation.leased:
            if asked and reservation.admitted:
                self._rescale(practice_id, down=True)  # too little left for one this size
            return reservation
        return Reservation(
            hold=self._open_lease(reservation, estimate_micros), state=reservation.state
        )

    async def release(self, hold: Hold) -> bool:
        share = hold.share
        if share is None:
            return await self.inner.release(hold)
        if share.done:
            return False
        share.done = True
        if share.lease.open:
            # Back into the lease: the row still holds it, for the next request.
            share.lease.taken_micros -= hold.amount_micros
            return True
        await self._give_back(hold.practice_id, hold.hold_id, hold.amount_micros)
        return True

    async def settle(
        self, hold: Hold, charge: Charge, *, now: int
    ) -> tuple[Written, BudgetSnapshot]:
        if hold.share is not None:
            hold.share.done = True  # a release after this is a no-op
        return await self.inner.settle(hold, charge, now=now)

    def close_leases(self, practice_id: str | None = None) -> None:
        """Close the open leases (of one practice): its next gate asks the database."""
        for lease in [*self._leases.values(), *self._next.values()]:
            if practice_id is None or lease.practice_id == practice_id:
                self._close_lease(lease)

    async def aclose(self, *, wait_seconds: float) -> None:
        """Close every lease and wait (up to `wait_seconds`) until what they did not use is back.

        A give-back retries while the database is unreachable; at shutdown it
        is not waited for longer than that: its rows expire by themselves.
        """
        self._closing = True
        self.close_leases()
        deadline = asyncio.get_running_loop().time() + wait_seconds
        while self._background:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                for task in list(self._background):
                    task.cancel()
                log.warning("leases not given back at shutdown: their holds expire by themselves")
                await asyncio.gather(*self._background, return_exceptions=True)
                break
            await asyncio.wait(list(self._background), timeout=left)
        self._closing = False

    # -- placing and taking ---------------------------------------------------------

    def _open_lease(self, reservation: Reservation, estimate_micros: int) -> Hold:
        """Make a lease of a hold the database placed as one; the first share is this request's."""
        hold = reservation.hold
        assert hold is not None
        share = max(1, estimate_micros)
        lease = Lease(
            hold_id=hold.hold_id,
            practice_id=hold.practice_id,
            amount_micros=hold.amount_micros,
            taken_micros=share,
            state=reservation.state,
            estimate_micros=share,
        )
        old = self._leases.get(hold.practice_id)
        if old is not None:
            self._close_lease(old)
        self._keep_lease(lease, self._leases)
        return replace(hold, amount_micros=share, share=Share(lease))

    def _keep_lease(self, lease: Lease, where: dict[str, Lease]) -> None:
        where[lease.practice_id] = lease
        loop = asyncio.get_running_loop()
        lease.placed_at = loop.time()
        lease.timer = loop.call_later(self.lease_seconds, self._lease_expired, lease)
        self.counts["placed"] += 1

    def _lease_requests_for(self, practice_id: str) -> int:
        """How many estimates the practice's next lease holds.

        `lease_requests` at first; doubled (up to MAX_LEASE_SCALE times) each
        time half a lease went in under an eighth of `lease_seconds`, so that
        at a high request rate a lease still lasts long enough for the next
        one to be placed ahead in time; halved when one expired less than
        half used or a gate found too little left for one this size.
        """
        return self.lease_requests * self._lease_scale.get(practice_id, 1)

    def _rescale(self, practice_id: str, *, down: bool) -> None:
        scale = self._lease_scale.get(practice_id, 1)
        scale = max(1, scale // 2) if down else min(MAX_LEASE_SCALE, scale * 2)
        if scale == 1:
            self._lease_scale.pop(practice_id, None)
        else:
            self._lease_scale[practice_id] = scale

    def _lease_expired(self, lease: Lease) -> None:
        if lease.open and 2 * lease.taken_micros < lease.amount_micros:
            self._rescale(lease.practice_id, down=True)
        self._close_lease(lease)

    def _from_leases(
        self, practice_id: str, request_id: str, estimate_micros: int, now: int
    ) -> Hold | None:
        """A share of the practice's open lease, else of the one placed ahead; or None.

        Once half of a lease is taken, the next one is asked for in the
        background, so that requests seldom wait for the database.
        """
        for _ in range(2):
            lease = self._leases.get(practice_id)
            if lease is None:
                lease = self._next.pop(practice_id, None)
                if lease is None:
                    return None
                self._leases[practice_id] = lease
            hold = self._take_from_lease(lease, request_id, estimate_micros, now)
            if hold is not None:
                if 2 * (lease.amount_micros - lease.taken_micros) < lease.amount_micros:
                    self._ask_ahead(lease)
                return hold
        return None

    def _take_from_lease(
        self, lease: Lease, request_id: str, estimate_micros: int, now: int
    ) -> Hold | None:
        """A request's share of an open lease, or None (and the lease closed) when it does not fit.

        It fits while the estimate is no more than what is left of it and the
        license still gives the period the lease was placed in: a new month,
        an expired license or the end of the grace go to the database.
        """
        share = max(1, estimate_micros)
        lic, period = lease.state.license, lease.state.period
        if (
            lease.open
            and lease.amount_micros - lease.taken_micros >= share
            and lic is not None
            and period is not None
            and current_period(lic, now, grace_seconds=self.period_grace_seconds) == period
        ):
            lease.taken_micros += share
            self.counts["admitted"] += 1
            return Hold(
                hold_id=lease.hold_id,
                practice_id=lease.practice_id,
                request_id=request_id,
                amount_micros=share,
                license=lic,
                period=period,
                budget_micros=lease.state.snapshot.budget_micros,
                share=Share(lease),
            )
        self._close_lease(lease)
        return None

    def _ask_ahead(self, lease: Lease) -> None:
        """Ask the database for the practice's next lease in the background (twice as large
        when half of this one went fast)."""
        practice_id = lease.practice_id
        if self._closing or practice_id in self._leasing or practice_id in self._next:
            return
        self._leasing.add(practice_id)
        if asyncio.get_running_loop().time() - lease.placed_at < self.lease_seconds / 8:
            self._rescale(practice_id, down=False)  # half gone fast: the next one is larger
        self._in_background(
            self._place_ahead(practice_id, lease.estimate_micros), f"lease ahead:{practice_id}"
        )

    async def _place_ahead(self, practice_id: str, estimate_micros: int) -> None:
        try:
            reservation = await self.inner.reserve(
                practice_id,
                request_id=self._lease_request_id,
                estimate_micros=estimate_micros,
                now=int(self._clock()),
                lease_micros=estimate_micros * self._lease_requests_for(practice_id),
            )
            hold = reservation.hold
            if hold is None:
                return
            if not reservation.leased or self._closing:
                # Too little left for a lease now (or the store is closing):
                # the hold is for no request, so it goes back at once.
                if not reservation.leased:
                    self._rescale(practice_id, down=True)
                await self._give_back(practice_id, hold.hold_id, hold.amount_micros)
                return
            lease = Lease(
                hold_id=hold.hold_id,
                practice_id=practice_id,
                amount_micros=hold.amount_micros,
                taken_micros=0,
                state=reservation.state,
                estimate_micros=estimate_micros,
            )
            self._keep_lease(lease, self._next)
        except Exception:
            log.exception("placing the next lease of practice %s failed", practice_id)
        finally:
            self._leasing.discard(practice_id)

    # -- closing and giving back ------------------------------------------------------

    def _close_lease(self, lease: Lease) -> None:
        """Admit nothing more on `lease`; give back in the background what was never taken."""
        if not lease.open:
            return
        lease.open = False
        if lease.timer is not None:
            lease.timer.cancel()
        for where in (self._leases, self._next):
            if where.get(lease.practice_id) is lease:
                del where[lease.practice_id]
        self.counts["closed"] += 1
        unused = lease.amount_micros - lease.taken_micros
        if unused > 0:
            self._in_background(
                self._give_back(lease.practice_id, lease.hold_id, unused),
                f"lease give-back:{lease.hold_id}",
            )

    def _in_background(self, work: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _give_back(self, practice_id: str, hold_id: str, amount_micros: int) -> None:
        """Take `amount_micros` off a lease's row (deleted at zero), retrying; never raises."""

        async def attempt() -> None:
            # Under the practice's lock, like every settle: the delete-or-update
            # pair cannot interleave with another share being taken off.
            async with self.db.transaction(lock=practice_id, shared=True) as conn:
                await take_off_hold(conn, practice_id, hold_id, amount_micros)

        try:
            await until_written(f"giving back lease {hold_id}", attempt, self.retry_seconds)
        except Exception:
            log.exception("giving back lease %s failed; its hold expires by itself", hold_id)
