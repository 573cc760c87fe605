"""Exact money conversions: micro-USD and Rappen."""

from decimal import Decimal

import pytest

from budget.money import (
    MICROS_PER_USD,
    RAPPEN_PER_CHF,
    chf_to_rappen,
    cost_to_micros,
    micros_to_float,
    micros_to_usd,
    rappen_to_chf,
    usd_to_micros,
)


def test_usd_to_micros_reads_str_int_and_decimal() -> None:
    """Configured USD figures become exact integer micro-USD."""
    assert usd_to_micros("20") == 20 * MICROS_PER_USD
    assert usd_to_micros(3) == 3_000_000
    assert usd_to_micros(Decimal("0.000435")) == 435


def test_usd_to_micros_rounds_half_even() -> None:
    """Half a micro-USD rounds to the even neighbour, not always up."""
    assert usd_to_micros("0.0000005") == 0
    assert usd_to_micros("0.0000015") == 2
    assert usd_to_micros("0.0000025") == 2


@pytest.mark.parametrize("bad", ["NaN", "inf", "-Infinity", "twelve"])
def test_usd_to_micros_rejects_non_finite(bad: str) -> None:
    """NaN, infinities and non-numbers raise ValueError instead of becoming money."""
    with pytest.raises(ValueError):
        usd_to_micros(bad)


def test_cost_to_micros_rounds_up() -> None:
    """A usage cost is rounded up to the next whole micro-USD, never down."""
    assert cost_to_micros(Decimal("0.000435")) == 435
    assert cost_to_micros(Decimal("0.0004350001")) == 436
    assert cost_to_micros(Decimal("0.00002468")) == 25
    assert cost_to_micros(Decimal("0.0000000001")) == 1
    assert cost_to_micros(Decimal(0)) == 0


def test_micros_to_usd_has_six_places() -> None:
    """micro-USD convert back to a Decimal with exactly six places."""
    assert str(micros_to_usd(435)) == "0.000435"
    assert str(micros_to_usd(20_000_000)) == "20.000000"
    assert micros_to_float(1_500_000) == 1.5


def test_chf_to_rappen_half_even_and_floats_via_str() -> None:
    """CHF become Rappen half-even; a float is read by its shortest text, so 0.1 is 10 Rappen."""
    assert RAPPEN_PER_CHF == 100
    assert chf_to_rappen(0.1) == 10
    assert chf_to_rappen(22.5) == 2250
    assert chf_to_rappen("22.505") == 2250
    assert chf_to_rappen("22.515") == 2252
    assert chf_to_rappen(30) == 3000
    assert chf_to_rappen("-1.5") == -150


def test_chf_to_rappen_rejects_non_finite() -> None:
    """A NaN or infinite CHF amount raises ValueError."""
    with pytest.raises(ValueError):
        chf_to_rappen(float("nan"))
    with pytest.raises(ValueError):
        chf_to_rappen("inf")


def test_rappen_to_chf_has_two_places() -> None:
    """Rappen convert back to CHF with exactly two places."""
    assert str(rappen_to_chf(2250)) == "22.50"
    assert str(rappen_to_chf(-5)) == "-0.05"
