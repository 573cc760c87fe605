"""Exact money for credit: CHF paid → internal USD credit, parsing at the edges.

Amounts are stored as integers (Rappen = 1/100 CHF, micro-USD = 1e-6 USD) and
handled as `Decimal` in between. The one rounding step is CHF → internal USD:
`chf / chf_per_internal_usd`, rounded half-even to the micro-USD (the seed's
rate 3: 30 CHF → 10 USD, 10 CHF → 3.333333 USD, 50 CHF → 16.666667 USD).
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

from budget.money import (
    InvalidAmount,
    chf_to_rappen,
    micros_to_usd,
    parse_decimal,
    rappen_to_chf,
    usd_to_micros,
)

__all__ = [
    "InvalidAmount",
    "chf_to_internal_micros",
    "chf_to_internal_usd",
    "chf_to_rappen",
    "micros_to_usd",
    "parse_chf",
    "parse_usd",
    "rappen_to_chf",
    "refund_share_micros",
    "usd_to_micros",
]

MICRO_USD = Decimal("0.000001")


def _exact(amount: Decimal, places: int, *, what: str) -> Decimal:
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -places:
        quantum = Decimal(1).scaleb(-places)
        if amount != amount.quantize(quantum):
            raise InvalidAmount(f"{what} has more than {places} decimal places")
    return amount


def parse_chf(value: Decimal | str | float | int, *, what: str = "amount_chf") -> Decimal:
    """A CHF amount from user input: finite and whole Rappen (sign is not checked here)."""
    return _exact(parse_decimal(value, what=what), 2, what=what)


def parse_usd(value: Decimal | str | float | int, *, what: str = "amount_usd") -> Decimal:
    """A USD amount from user input: finite and whole micro-USD (sign is not checked here)."""
    return _exact(parse_decimal(value, what=what), 6, what=what)


def chf_to_internal_usd(chf: Decimal | str | int, chf_per_internal_usd: Decimal) -> Decimal:
    """Internal USD credit bought by `chf` CHF, rounded half-even to the micro-USD."""
    if chf_per_internal_usd <= 0:
        raise InvalidAmount("chf_per_internal_usd must be positive")
    return (Decimal(chf) / chf_per_internal_usd).quantize(MICRO_USD, rounding=ROUND_HALF_EVEN)


def chf_to_internal_micros(chf: Decimal | str | int, chf_per_internal_usd: Decimal) -> int:
    """`chf_to_internal_usd` in integer micro-USD."""
    return usd_to_micros(chf_to_internal_usd(chf, chf_per_internal_usd))


def refund_share_micros(credit_micros: int, paid_rappen: int, refunded_rappen: int) -> int:
    """Credit (micro-USD) matching `refunded_rappen` of a payment, at that payment's own rate.

    `credit_micros * refunded / paid`, rounded half-even; a full refund gives
    back exactly `credit_micros`. Callers pass the *cumulative* refunded amount
    and subtract what earlier refunds took, so rounding never drifts.
    """
    if paid_rappen <= 0:
        return 0
    refunded = min(max(refunded_rappen, 0), paid_rappen)
    share = (Decimal(credit_micros) * refunded / paid_rappen).quantize(
        Decimal(1), rounding=ROUND_HALF_EVEN
    )
    return int(share)
