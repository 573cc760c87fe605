"""Leases for per-key and per-device limits: most limited requests need no round trip.

Like the budget's leases (`gateway.storage.leases`), and for the same
reason: a key with limits far from being reached should cost the gate next
to nothing. Both kinds are taken from the database, so every instance still
counts against one total, and each only ever makes the gateway stricter:

- **Rate slots.** Instead of one request, a gate counts up to
  `MAX_SLOTS` requests (and that many times its tokens) in the window at
  once, and admits the instance's next requests in the same window against
  them in memory. A chunk is at most a sixteenth of the limit, and when it
  no longer fits the gate counts the request alone, so near the limit the
  count is exact; slots left unused when the window turns were counted but
  never used (another instance may have been refused meanwhile: by at most
  a chunk per instance).
- **Cap leases.** Instead of one estimate, a gate holds `MAX_SLOTS`
  estimates against the cap, only while four times that is left, and
  admits the next requests against the lease in memory for `lease_seconds`.
  Settled costs are added to the subject's spend when the lease closes and
  its last request is done, in one transaction that also drops the lease's
  hold (retried while the database is unreachable, as a settle is); near
  the cap, every request holds its own estimate, as without leases. A
  gateway that crashes with a lease open loses that lease's spend
  from the subject's total (its hold expires by itself): at most one lease.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import Counter
from dataclasses import dataclass, field

from budget.limits import Subject, Window
from gateway.storage.holds import until_written
from gateway.storage.limits import CapHold, LimitStore

log = logging.getLogger("aza.gateway.limits")

MAX_SLOTS = 16


@dataclass(slots=True)
class _Slots:
    window_start_ms: int
    requests: int
    tokens: int


@dataclass(slots=True, eq=False)
class CapLease:
    """A hold of several estimates against a subject's cap, admitted against in memory."""

    subject: Subject
    hold_id: str
    amount_micros: int
    period_start: int
    taken_micros: int = 0
    spent_micros: int = 0
    in_flight: int = 0
    open: bool = True
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


def _key(subject: Subject) -> tuple[str, str, str]:
    return (subject.practice_id, str(subject.scope), subject.name)


class LimitLeases:
    """Rate slots and cap leases over a `LimitStore` (see the module docstring)."""

    def __init__(
        self, store: LimitStore, *, lease_seconds: float = 1.0, retry_seconds: float = 900.0
    ) -> None:
        self.store = store
        self.lease_seconds = lease_seconds
        # A closing lease's spend is written like a settle: retried while the database is away.
        self.retry_seconds = retry_seconds
        self._slots: dict[tuple[str, str, str], _Slots] = {}
        self._leases: dict[tuple[str, str, str], CapLease] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}
        self._ids = (f"lease:{secrets.token_hex(8)}:{n}" for n in itertools.count(1))
        self._background: set[asyncio.Task[None]] = set()
        # Slots and leases taken, requests admitted on them; the tests read it.
        self.counts: Counter[str] = Counter()

    # -- rate slots -----------------------------------------------------------

    def _chunk(self, subject: Subject, tokens: int) -> int:
        limits = subject.limits
        chunk = MAX_SLOTS
        if limits.requests_per_minute is not None:
            chunk = min(chunk, limits.requests_per_minute // MAX_SLOTS)
        if limits.tokens_per_minute is not None:
            chunk = min(chunk, limits.tokens_per_minute // (MAX_SLOTS * max(1, tokens)))
        return max(1, chunk)

    def _lock(self, key: tuple[str, str, str]) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            if len(self._locks) > 10_000:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _from_slots(self, key: tuple[str, str, str], tokens: int, window: Window) -> bool:
        slots = self._slots.get(key)
        if (
            slots is not None
            and slots.window_start_ms == window.start_ms
            and slots.requests >= 1
            and slots.tokens >= tokens
        ):
            slots.requests -= 1
            slots.tokens -= tokens
            self.counts["slot_admitted"] += 1
            return True
        return False

    async def take_rate(self, subject: Subject, *, tokens: int, window: Window) -> bool:
        """Admit one request of `tokens` in `window`: from this instance's slots, or by
        counting a chunk (or, near the limit, the request alone) in the database."""
        key = _key(subject)
        if self._from_slots(key, tokens, window):
            return True
        # One gate of a subject asks the database at a time; the others then use its slots.
        async with self._lock(key):
            if self._from_slots(key, tokens, window):
                return True
            return await self._take_chunk(key, subject, tokens, window)

    async def _take_chunk(
        self, key: tuple[str, str, str], subject: Subject, tokens: int, window: Window
    ) -> bool:
        chunk = self._chunk(subject, tokens)
        if chunk > 1 and await self.store.take_rate(
            subject, tokens=chunk * tokens, window=window, requests=chunk
        ):
            if len(self._slots) > 10_000:
                self._slots.clear()
            self._slots[key] = _Slots(window.start_ms, chunk - 1, (chunk - 1) * tokens)
            self.counts["slots_taken"] += 1
            return True
        return await self.store.take_rate(subject, tokens=tokens, window=window)

    # -- cap leases -----------------------------------------------------------

    async def hold_cap(
        self, subject: Subject, *, hold_id: str, estimate_micros: int, period_start: int
    ) -> CapHold | None:
        """The request's estimate against the cap: from the open lease, a new lease, or
        (near the cap) a hold of its own; None when it does not fit."""
        key = _key(subject)
        amount = max(1, estimate_micros)
        share = self._from_lease(key, subject, amount, period_start)
        if share is not None:
            return share
        async with self._lock((key[0], "cap:" + key[1], key[2])):
            share = self._from_lease(key, subject, amount, period_start)
            if share is not None:
                return share
            return await self._place_lease(key, subject, hold_id, amount, period_start)

    def _from_lease(
        self, key: tuple[str, str, str], subject: Subject, amount: int, period_start: int
    ) -> CapHold | None:
        lease = self._leases.get(key)
        if lease is not None:
            if (
                lease.open
                and lease.period_start == period_start
                and lease.subject.limits == subject.limits
                and lease.amount_micros - lease.taken_micros >= amount
            ):
                lease.taken_micros += amount
                lease.in_flight += 1
                self.counts["lease_admitted"] += 1
                return CapHold(subject, lease.hold_id, amount, period_start, lease=lease)
            self._close(lease)
        return None

    async def _place_lease(
        self,
        key: tuple[str, str, str],
        subject: Subject,
        hold_id: str,
        amount: int,
        period_start: int,
    ) -> CapHold | None:
        placed = await self.store.hold_cap(
            subject,
            hold_id=next(self._ids),
            estimate_micros=MAX_SLOTS * amount,
            period_start=period_start,
            require_micros=4 * MAX_SLOTS * amount,
        )
        if placed is None:
            return await self.store.hold_cap(
                subject, hold_id=hold_id, estimate_micros=amount, period_start=period_start
            )
        lease = CapLease(subject, placed.hold_id, placed.amount_micros, period_start, amount, 0, 1)
        old = self._leases.get(key)
        if old is not None:
            self._close(old)
        self._leases[key] = lease
        lease.timer = asyncio.get_running_loop().call_later(self.lease_seconds, self._close, lease)
        self.counts["leases_placed"] += 1
        return CapHold(subject, lease.hold_id, amount, period_start, lease=lease)

    def _close(self, lease: CapLease) -> None:
        if not lease.open:
            return
        lease.open = False
        if lease.timer is not None:
            lease.timer.cancel()
        key = _key(lease.subject)
        if self._leases.get(key) is lease:
            del self._leases[key]
        if lease.in_flight == 0:
            self._flush_later(lease)

    def _flush_later(self, lease: CapLease) -> None:
        task = asyncio.ensure_future(self._flush(lease))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _flush(self, lease: CapLease) -> None:
        hold = CapHold(lease.subject, lease.hold_id, lease.amount_micros, lease.period_start)
        try:
            await until_written(
                f"closing the cap lease {lease.hold_id}",
                lambda: self.store.settle_cap(hold, lease.spent_micros),
                self.retry_seconds,
            )
        except Exception:
            log.exception("closing the cap lease %s failed; its hold expires", lease.hold_id)

    def done(self, hold: CapHold, cost_micros: int | None) -> bool:
        """A lease share settled (`cost_micros`) or released (None); False for an own hold."""
        lease = hold.lease
        if not isinstance(lease, CapLease):
            return False
        lease.in_flight -= 1
        if cost_micros is None:
            lease.taken_micros -= hold.amount_micros
        else:
            lease.spent_micros += cost_micros
        if not lease.open and lease.in_flight == 0:
            self._flush_later(lease)
        return True

    async def aclose(self) -> None:
        """Close every lease and wait until the done ones are written."""
        for lease in list(self._leases.values()):
            self._close(lease)
        if self._background:
            await asyncio.wait(list(self._background), timeout=10.0)
