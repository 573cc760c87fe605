"""Extra credit as the budget sees it: the seed's snapshot tests over credit's ledger."""

from __future__ import annotations

from typing import Any

from budget.snapshot import BudgetSnapshot
from credit.ports import Database

from .helpers import book, service

USD = 1_000_000


def _percent(remaining: int, used: int, budget: int, extra: int) -> int:
    assert remaining == max(0, budget - used)
    return BudgetSnapshot(budget * USD, used * USD, extra * USD, 0).available_percent


def test_available_percent_can_exceed_100() -> None:
    """20 USD budget unused plus 10 USD extra credit is 150 %."""
    assert _percent(remaining=20, used=0, budget=20, extra=10) == 150


def test_available_percent_extra_only_50() -> None:
    """Budget used up, 10 USD extra credit on a 20 USD budget is 50 %."""
    assert _percent(remaining=0, used=20, budget=20, extra=10) == 50


def test_available_percent_mixed_130() -> None:
    """6 USD budget left plus 20 USD extra on a 20 USD budget is 130 %."""
    assert _percent(remaining=6, used=14, budget=20, extra=20) == 130


async def test_budget_includes_extra_when_monthly_exhausted(
    db: Database, metering: Any, practice: str
) -> None:
    """With the monthly budget used up, credit's ledger balance still admits a request."""
    await book(db, practice=practice, usd="20", chf="30", checkout_session_id="cs_paid")
    state = await metering.state(practice)
    async with db.transaction(lock=practice) as conn:
        await conn.execute(
            "INSERT INTO ai_usage_period_totals (practice_id, period_start, used_micro_usd, "
            "used_credit_micro_usd, events) VALUES (?, ?, ?, 0, 1)",
            practice,
            state.period.start,
            state.snapshot.budget_micros,
        )
    snap = (await metering.state(practice)).snapshot
    assert snap.remaining_micros == 0
    assert snap.extra_credit_micros == await service(db).extra_credit_micros(practice) > 0
    reservation = await metering.reserve(practice, request_id="u1", estimate_micros=1000)
    assert reservation.admitted
