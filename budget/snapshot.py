"""A practice's budget at one moment, and the decisions made from it (all micro-USD)."""

from __future__ import annotations

from dataclasses import dataclass

from budget.money import micros_to_float


@dataclass(frozen=True, slots=True)
class BudgetSnapshot:
    """Monthly budget, what this period used, extra credit left and holds in flight; micro-USD."""

    budget_micros: int
    used_micros: int
    extra_credit_micros: int
    held_micros: int

    @property
    def remaining_micros(self) -> int:
        """Monthly budget left this period, never below 0; micro-USD."""
        return max(0, self.budget_micros - self.used_micros)

    @property
    def available_micros(self) -> int:
        """What a new request may still spend: remaining + extra credit - holds, >= 0; micro-USD."""
        return max(0, self.remaining_micros + self.extra_credit_micros - self.held_micros)

    @property
    def available_percent(self) -> int:
        """(remaining + extra credit) as a whole percent of the monthly budget, rounded half up.

        May exceed 100 when extra credit is left. With no budget: 100 when
        there is extra credit, else 0. Holds in flight are not subtracted.
        """
        left = max(0, self.remaining_micros + self.extra_credit_micros)
        if self.budget_micros <= 0:
            return 100 if self.extra_credit_micros > 0 else 0
        # Integer half-up rounding of 100 * left / budget.
        return (200 * left + self.budget_micros) // (2 * self.budget_micros)

    def to_dict(self) -> dict[str, float | int]:
        """The snapshot for JSON: USD amounts as floats (display only) and the percent."""
        return {
            "budget_usd": micros_to_float(self.budget_micros),
            "used_usd": micros_to_float(self.used_micros),
            "remaining_usd": micros_to_float(self.remaining_micros),
            "extra_credit_remaining_usd": micros_to_float(self.extra_credit_micros),
            "held_usd": micros_to_float(self.held_micros),
            "available_usd": micros_to_float(self.available_micros),
            "available_percent": self.available_percent,
        }


def split_charge(cost_micros: int, remaining_budget_micros: int) -> tuple[int, int]:
    """Split a cost into (monthly budget part, extra credit part); micro-USD, budget first."""
    if cost_micros < 0:
        raise ValueError(f"a cost cannot be negative: {cost_micros}")
    to_budget = min(cost_micros, max(0, remaining_budget_micros))
    return to_budget, cost_micros - to_budget


@dataclass(frozen=True)
class Admission:
    """Whether a request may go upstream, and the hold it places; micro-USD.

    `leased`: the hold is a lease, `hold_micros` for this request and the
    next ones of the same gateway instance (see `admit`).
    """

    admitted: bool
    hold_micros: int
    leased: bool = False


# A lease is placed only while the practice has at least this many times the
# lease available: it never takes more than a quarter of what is left.
LEASE_FLOOR_FACTOR = 4


def admit(snapshot: BudgetSnapshot, estimate_micros: int, *, lease_micros: int = 0) -> Admission:
    """Admit when anything is available; hold min(estimate, available), at least 1 micro-USD.

    With `lease_micros` (> estimate) asked for, and at least
    LEASE_FLOOR_FACTOR times that available, the hold is the whole lease
    instead: budget set aside for this request and the next ones, which the
    gateway then admits against it without asking the database again. Close
    to an empty budget no lease is placed, so there every request is judged
    against the database on its own, as without leases.
    """
    available = snapshot.available_micros
    if available <= 0:
        return Admission(admitted=False, hold_micros=0)
    if lease_micros > estimate_micros and available >= LEASE_FLOOR_FACTOR * lease_micros:
        return Admission(admitted=True, hold_micros=lease_micros, leased=True)
    return Admission(admitted=True, hold_micros=max(1, min(estimate_micros, available)))
