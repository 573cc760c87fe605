"""Budget snapshot arithmetic, charge splitting and admission (micro-USD)."""

import pytest

from budget.snapshot import LEASE_FLOOR_FACTOR, Admission, BudgetSnapshot, admit, split_charge

USD = 1_000_000


def snap(budget: int, used: int, extra: int, held: int = 0) -> BudgetSnapshot:
    return BudgetSnapshot(
        budget_micros=budget, used_micros=used, extra_credit_micros=extra, held_micros=held
    )


def test_seed_percent_can_exceed_100() -> None:
    """Budget 20, remaining 20, extra 10 -> 150 % (seed)."""
    assert snap(20 * USD, 0, 10 * USD).available_percent == 150


def test_seed_percent_extra_only_50() -> None:
    """Budget 20, remaining 0, extra 10 -> 50 % (seed)."""
    assert snap(20 * USD, 20 * USD, 10 * USD).available_percent == 50


def test_seed_percent_mixed_130() -> None:
    """Budget 20, remaining 6, extra 20 -> 130 % (seed)."""
    assert snap(20 * USD, 14 * USD, 20 * USD).available_percent == 130


def test_percent_rounds_half_up_and_handles_no_budget() -> None:
    """0.5 % rounds to 1, 0.49.. % to 0; a zero budget is 100 % with extra credit, else 0."""
    assert snap(200, 199, 0).available_percent == 1
    assert snap(201, 200, 0).available_percent == 0
    assert snap(0, 0, 5).available_percent == 100
    assert snap(0, 0, 0).available_percent == 0


def test_available_subtracts_holds_and_never_goes_negative() -> None:
    """available = max(0, budget - used) + extra - held, clamped at 0."""
    s = snap(20 * USD, 25 * USD, 3 * USD, held=1 * USD)
    assert s.remaining_micros == 0
    assert s.available_micros == 2 * USD
    assert snap(USD, 0, 0, held=2 * USD).available_micros == 0


def test_to_dict_reports_usd_floats_and_percent() -> None:
    """to_dict gives the JSON figures in USD and the percent."""
    assert snap(20 * USD, 14 * USD, 20 * USD, held=500_000).to_dict() == {
        "budget_usd": 20.0,
        "used_usd": 14.0,
        "remaining_usd": 6.0,
        "extra_credit_remaining_usd": 20.0,
        "held_usd": 0.5,
        "available_usd": 25.5,
        "available_percent": 130,
    }


def test_split_charge_budget_first() -> None:
    """A cost takes the remaining budget first and the rest from extra credit."""
    assert split_charge(500, 300) == (300, 200)
    assert split_charge(500, 1000) == (500, 0)
    assert split_charge(500, 0) == (0, 500)
    assert split_charge(500, -20) == (0, 500)
    with pytest.raises(ValueError):
        split_charge(-1, 10)


def test_admit_holds_at_most_what_is_available() -> None:
    """admit holds the estimate, capped at what is available, and refuses at 0."""
    assert admit(snap(USD, 0, 0), 400) == Admission(admitted=True, hold_micros=400)
    assert admit(snap(USD, 0, 0, held=USD - 100), 400) == Admission(True, 100)
    assert admit(snap(USD, USD, 0), 400) == Admission(admitted=False, hold_micros=0)
    assert admit(snap(0, 0, 50), 400) == Admission(True, 50)


def test_admit_holds_at_least_one_micro() -> None:
    """An admitted request with a zero estimate (a free model) still holds 1 micro-USD."""
    assert admit(snap(USD, 0, 0), 0) == Admission(True, 1)


def test_admit_places_a_lease_only_with_four_leases_available() -> None:
    """A lease is held whole while at least LEASE_FLOOR_FACTOR of it is available, else not."""
    lease = 1_000
    floor = LEASE_FLOOR_FACTOR * lease
    assert admit(snap(floor, 0, 0), 100, lease_micros=lease) == Admission(True, lease, True)
    assert admit(snap(floor, 1, 0), 100, lease_micros=lease) == Admission(True, 100)
    assert admit(snap(floor, 0, 0, held=floor - 50), 100, lease_micros=lease) == Admission(True, 50)
    # Extra credit counts toward the floor; a lease no bigger than the estimate is none.
    assert admit(snap(0, 0, floor), 100, lease_micros=lease).leased
    assert admit(snap(floor, 0, 0), lease, lease_micros=lease) == Admission(True, lease)
    assert admit(snap(floor, floor, 0), 100, lease_micros=lease) == Admission(False, 0)
