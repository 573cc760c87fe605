"""Holds: what the gate places, settle replaces and release drops, and their SQL.

A hold (`ai_budget_holds`) reserves a request's estimate while it is in
flight, so concurrent requests cannot together spend more than is left;
it expires by itself (`hold_ttl_seconds`) if its gateway dies. With leases
(`gateway.storage.leases`) one row holds several requests' estimates, each
request's `Hold` a share of it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from budget.license import License, Period
from credit.ports import Connection, Database, DatabaseUnavailable
from gateway.storage.budget_state import BudgetState

if TYPE_CHECKING:
    from gateway.storage.leases import Share

log = logging.getLogger("aza.metering")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation of budget for one request in flight.

    With `share`, the request's part (`amount_micros`) of a lease, the hold
    row `hold_id` that several requests share.
    """

    hold_id: str
    practice_id: str
    request_id: str
    amount_micros: int
    license: License
    period: Period
    budget_micros: int
    share: Share | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Reservation:
    """The gate's answer: a hold, or the state that blocked it.

    `leased`: the database placed the hold as a lease (the `lease_micros` a
    leasing gate asked for), not as the request's estimate.
    """

    hold: Hold | None
    state: BudgetState
    leased: bool = False

    @property
    def admitted(self) -> bool:
        return self.hold is not None


@dataclass(frozen=True, slots=True)
class Settlement:
    """What settling a request wrote."""

    event_id: int | None  # None: this request was settled before (no-op)
    cost_micros: int
    charged_budget_micros: int
    charged_credit_micros: int
    state: BudgetState | None


class HoldIds:
    """Hold ids: 96 random bits for this store, then a counter.

    Unique across processes and instances like a uuid4, without a call to the
    system's random source for every request.
    """

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(12)
        self._seq = itertools.count(1)

    def new(self) -> str:
        return f"{self.prefix}{next(self._seq):08x}"


async def until_written(what: str, attempt: Callable[[], Awaitable[T]], retry_seconds: float) -> T:
    """Run an idempotent write, retrying while the database is unreachable.

    Settling and releasing must not be lost to a dropped connection or a
    short outage: both are safe to repeat (the usage event is unique per
    request, a deleted hold stays deleted), so they are retried with
    backoff for up to `retry_seconds`.
    """
    delay, waited = 0.05, 0.0
    while True:
        try:
            return await attempt()
        except DatabaseUnavailable:
            if waited >= retry_seconds:
                raise
            log.warning("database unavailable while %s; retrying in %.2fs", what, delay)
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)


async def insert_hold(
    conn: Connection,
    *,
    hold_id: str,
    practice_id: str,
    request_id: str,
    amount_micros: int,
    now: int,
    expires_at: int,
) -> None:
    await conn.execute(
        "INSERT INTO ai_budget_holds (hold_id, practice_id, request_id, amount_micro_usd, "
        "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
        hold_id,
        practice_id,
        request_id,
        amount_micros,
        now,
        expires_at,
    )


async def delete_hold(conn: Connection, practice_id: str, hold_id: str) -> int:
    """Delete one hold; returns how many rows went (0: it was gone)."""
    return await conn.execute(
        "DELETE FROM ai_budget_holds WHERE practice_id = ? AND hold_id = ?",
        practice_id,
        hold_id,
    )


async def delete_hold_once(db: Database, practice_id: str, hold_id: str) -> int:
    """Delete one hold; a statement of its own (freeing budget needs no lock)."""
    async with db.read() as conn:
        return await delete_hold(conn, practice_id, hold_id)


async def take_off_hold(
    conn: Connection, practice_id: str, hold_id: str, amount_micros: int
) -> None:
    """Delete the hold when `amount_micros` covers it, else take that much off it."""
    deleted = await conn.execute(
        "DELETE FROM ai_budget_holds WHERE practice_id = ? AND hold_id = ? "
        "AND amount_micro_usd <= ?",
        practice_id,
        hold_id,
        amount_micros,
    )
    if not deleted:
        await conn.execute(
            "UPDATE ai_budget_holds SET amount_micro_usd = amount_micro_usd - ? "
            "WHERE practice_id = ? AND hold_id = ?",
            amount_micros,
            practice_id,
            hold_id,
        )
