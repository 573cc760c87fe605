"""A practice's budget state as the gate reads it: license, period and money, in one query.

The money (the period's usage, the extra credit left, what holds reserve) is
summed by the money SQL written once (`credit/money_sql.py`, `MONEY_COLUMNS`);
the license is read through `credit.licenses`. `StateReader` turns a row into a `BudgetState`
by the rules of `budget.license` (which period a license gives now) and the
plan book (the monthly budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from budget.license import License, LicenseProblem, Period, current_period
from budget.pricing import PlanBook
from budget.snapshot import BudgetSnapshot
from credit.licenses import BEST_LICENSE_SQL, license_from_row
from credit.money_sql import MONEY_COLUMNS, PERIOD_USED_SQL
from credit.ports import Connection, Row

# Used, extra credit and held amounts in one query (the settle's read of money).
_SNAPSHOT_SQL = f"SELECT {MONEY_COLUMNS}"
# The gate's one read: the license row and the money, the period's usage read
# for the period the caller expects (checked against the license afterwards).
_STATE_SQL = f"""
SELECT lic.*, {MONEY_COLUMNS}
FROM (SELECT 1 AS one) AS base
LEFT JOIN ({BEST_LICENSE_SQL}) AS lic ON 1 = 1
"""
# The license columns the one-call gate expects unchanged (see Expected).
LICENSE_ROW = (
    "subscription_id",
    "status",
    "lookup_key",
    "customer_id",
    "customer_email",
    "current_period_start",
    "current_period_end",
)


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A practice's license, budget period and snapshot at one moment."""

    license: License | None
    period: Period | None
    problem: LicenseProblem | None
    snapshot: BudgetSnapshot


@dataclass(frozen=True, slots=True)
class Expected:
    """A practice's license row (`LICENSE_ROW`), period and budget at its last full gate."""

    row: tuple[Any, ...]
    period: Period
    budget_micros: int


def snapshot_of(row: Row, budget_micros: int) -> BudgetSnapshot:
    """The snapshot of a row with `MONEY_COLUMNS` (used, credited, credit_used, held)."""
    return BudgetSnapshot(
        budget_micros=budget_micros,
        used_micros=int(row["used"]),
        extra_credit_micros=int(row["credited"]) - int(row["credit_used"]),
        held_micros=int(row["held"]),
    )


class StateReader:
    """Reads budget states; remembers each practice's period (and, for the one-call
    gate, its license row: `expected`) from its last read."""

    def __init__(self, plans: PlanBook, *, period_grace_seconds: int, remember: bool) -> None:
        self.plans = plans
        self.period_grace_seconds = period_grace_seconds
        # The budget period each practice had at its last read (a hint, see read).
        self._period_hint: dict[str, int] = {}
        # With `remember`: the license row, period and budget of each practice's
        # last full read, which the one-call gate expects unchanged.
        self.expected: dict[str, Expected] = {}
        self._remember = remember

    def judge(
        self, row: Row, now: int
    ) -> tuple[License | None, Period | None, LicenseProblem | None, int]:
        """The license of a state row, its period now (or the problem) and its monthly budget."""
        lic = None if row["practice_id"] is None else license_from_row(row)
        period_or_problem = current_period(lic, now, grace_seconds=self.period_grace_seconds)
        budget = (self.plans.monthly_budget_micros(lic.lookup_key) if lic else None) or 0
        if isinstance(period_or_problem, LicenseProblem):
            return lic, None, period_or_problem, budget
        return lic, period_or_problem, None, budget

    async def read(self, conn: Connection, practice_id: str, now: int) -> BudgetState:
        """License, period and snapshot in one query (two when the period changed).

        The period's usage is read for the period this practice had last
        time; when the license now says another one (the first request, a
        new month, a renewal), it is read again for the right one.
        """
        expected = self._period_hint.get(practice_id, -1)
        row = await conn.fetchone(
            _STATE_SQL,
            practice_id,
            expected,
            practice_id,
            practice_id,
            practice_id,
            now,
            practice_id,
        )
        assert row is not None  # one row from `base`, the license joined or NULL
        lic, period, problem, budget = self.judge(row, now)
        period_start = -1 if period is None else period.start
        used = int(row["used"])
        if period_start != expected:
            self._period_hint[practice_id] = period_start
            used = int(await conn.fetchval(PERIOD_USED_SQL, practice_id, period_start))
        if self._remember and period is not None:
            self.expected[practice_id] = Expected(
                tuple(row[column] for column in LICENSE_ROW), period, budget
            )
        snapshot = BudgetSnapshot(
            budget_micros=budget,
            used_micros=used,
            extra_credit_micros=int(row["credited"]) - int(row["credit_used"]),
            held_micros=int(row["held"]),
        )
        return BudgetState(license=lic, period=period, problem=problem, snapshot=snapshot)

    async def snapshot(
        self, conn: Connection, practice_id: str, period_start: int, budget_micros: int, now: int
    ) -> BudgetSnapshot:
        """Used, extra credit and held amounts in one query."""
        row = await conn.fetchone(
            _SNAPSHOT_SQL, practice_id, period_start, practice_id, practice_id, practice_id, now
        )
        assert row is not None  # an aggregate query always returns one row
        return snapshot_of(row, budget_micros)
