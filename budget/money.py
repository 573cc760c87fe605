"""Exact money: USD as integer micro-USD, CHF as integer Rappen.

Amounts are converted to integers at the edges and added up as integers. Two
roundings exist and both live here: `usd_to_micros` / `chf_to_rappen` round
half-even (configured figures, user input), and `cost_to_micros` rounds a usage
cost *up* to the next whole micro-USD, so a cost is never under-charged.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Context, Decimal, InvalidOperation

MICROS_PER_USD = 1_000_000
RAPPEN_PER_CHF = 100

_ONE = Decimal(1)
_MICRO_USD = Decimal("0.000001")
_RAPPEN = Decimal("0.01")
# Wide enough that shifting the decimal point never rounds; only the explicit
# rounding below does. An amount too large for it raises instead of rounding.
_EXACT = Context(prec=60, traps=[InvalidOperation])


class InvalidAmount(ValueError):
    """An amount that is not a finite, exact, sensible number of its currency."""


def parse_decimal(value: object, *, what: str = "amount", finite: bool = True) -> Decimal:
    """The one parser of decimal numbers from outside (config, user input, Stripe metadata).

    Takes a Decimal, an int, a numeric string (stripped) or a float (through
    its shortest text, so 0.1 is 0.1 and not the binary neighbour); refuses
    booleans, other types, empty text and non-numbers, and with `finite`
    NaN and infinities, raising InvalidAmount (a ValueError) that names `what`.
    """
    if isinstance(value, bool) or not isinstance(value, Decimal | str | int | float):
        raise InvalidAmount(f"{what} must be a number, not {type(value).__name__}")
    if isinstance(value, float):
        value = repr(value)
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise InvalidAmount(f"{what} is empty")
    try:
        amount = Decimal(value)
    except (InvalidOperation, ValueError, TypeError):
        raise InvalidAmount(f"{what} is not a number: {value!r}") from None
    if finite and not amount.is_finite():
        raise InvalidAmount(f"{what} must be a finite number")
    return amount


def _to_units(value: Decimal, places: int, rounding: str) -> int:
    """`value` x 10**places as an integer, rounded once with `rounding`."""
    try:
        return int(value.scaleb(places, _EXACT).quantize(_ONE, rounding, _EXACT))
    except InvalidOperation:
        raise ValueError(f"amount out of range: {value}") from None


def usd_to_micros(amount: Decimal | str | int) -> int:
    """USD amount -> integer micro-USD, rounded half-even; NaN/inf raise ValueError."""
    if isinstance(amount, float):
        raise TypeError("pass USD as Decimal, str or int, not float")
    value = parse_decimal(amount)
    return _to_units(value, 6, ROUND_HALF_EVEN)


def cost_to_micros(amount: Decimal) -> int:
    """Usage cost in USD -> integer micro-USD, rounded UP (never under-charged).

    This is the one place a usage cost is rounded.
    """
    value = parse_decimal(amount)
    return _to_units(value, 6, ROUND_CEILING)


def micros_to_usd(micros: int) -> Decimal:
    """Integer micro-USD -> USD as a Decimal with exactly 6 places."""
    return Decimal(micros).scaleb(-6, _EXACT).quantize(_MICRO_USD, context=_EXACT)


def micros_to_float(micros: int) -> float:
    """Integer micro-USD -> USD as a float, for display (JSON) only, never for arithmetic."""
    return float(micros_to_usd(micros))


def chf_to_rappen(amount: Decimal | str | int | float) -> int:
    """CHF amount -> integer Rappen, rounded half-even; the sign is kept (callers validate).

    A float goes through str() first; NaN/inf raise ValueError.
    """
    value = parse_decimal(amount)
    return _to_units(value, 2, ROUND_HALF_EVEN)


def rappen_to_chf(rappen: int) -> Decimal:
    """Integer Rappen -> CHF as a Decimal with exactly 2 places."""
    return Decimal(rappen).scaleb(-2, _EXACT).quantize(_RAPPEN, context=_EXACT)


def with_uplift(amount_usd: Decimal, percent: Decimal) -> Decimal:
    """`amount_usd` plus `percent` % (an upstream's price uplift), exactly (no rounding here)."""
    if not percent:
        return amount_usd
    return _EXACT.multiply(amount_usd, _EXACT.add(Decimal(100), percent)).scaleb(-2, _EXACT)
