"""Budget periods from licenses: Stripe periods with grace, calendar months otherwise."""

from datetime import UTC, datetime

from budget.license import License, LicenseProblem, Period, calendar_month, current_period

GRACE = 172_800


def ts(year: int, month: int, day: int, hour: int = 0) -> int:
    return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp())


def lic(
    subscription_id: str = "sub_1", status: str = "active", start: int = 0, end: int = 0
) -> License:
    return License(
        subscription_id=subscription_id,
        practice_id="prac_1",
        status=status,
        lookup_key="aza_basic_monthly",
        customer_id="cus_1",
        customer_email=None,
        period_start=start,
        period_end=end,
    )


def test_missing_and_inactive_licenses() -> None:
    """No license is LICENSE_MISSING; a canceled one LICENSE_INACTIVE; past_due still works."""
    now = ts(2025, 3, 10)
    assert current_period(None, now, grace_seconds=GRACE) is LicenseProblem.MISSING
    canceled = lic(status="canceled", start=now - 10, end=now + 10)
    assert current_period(canceled, now, grace_seconds=GRACE) is LicenseProblem.INACTIVE
    past_due = lic(status="past_due", start=now - 10, end=now + 10)
    assert current_period(past_due, now, grace_seconds=GRACE) == Period(now - 10, now + 10)


def test_stripe_period_with_grace() -> None:
    """A sub_ license keeps its period until period_end + grace, then is LICENSE_EXPIRED."""
    start, end = ts(2025, 3, 5), ts(2025, 4, 5)
    stripe = lic(start=start, end=end)
    assert stripe.stripe_driven
    assert current_period(stripe, start + 1, grace_seconds=GRACE) == Period(start, end)
    assert current_period(stripe, end + GRACE, grace_seconds=GRACE) == Period(start, end)
    assert current_period(stripe, end + GRACE + 1, grace_seconds=GRACE) is LicenseProblem.EXPIRED


def test_manual_license_uses_own_period_then_calendar_month() -> None:
    """A non-Stripe license uses its period while inside it, then the UTC calendar month."""
    start, end = ts(2025, 3, 5), ts(2025, 4, 5)
    manual = lic(subscription_id="manual_1", start=start, end=end)
    assert not manual.stripe_driven
    assert current_period(manual, start, grace_seconds=GRACE) == Period(start, end)
    later = ts(2025, 6, 15, 12)
    assert current_period(manual, later, grace_seconds=GRACE) == Period(
        ts(2025, 6, 1), ts(2025, 7, 1)
    )


def test_calendar_month_rolls_over_the_year() -> None:
    """The last second of December belongs to December; the next starts January's month."""
    new_year = ts(2026, 1, 1)
    assert calendar_month(new_year - 1) == Period(ts(2025, 12, 1), new_year)
    assert calendar_month(new_year) == Period(new_year, ts(2026, 2, 1))
    assert calendar_month(ts(2024, 2, 29, 23)) == Period(ts(2024, 2, 1), ts(2024, 3, 1))


def test_manual_period_ending_mid_month_does_not_overlap_the_next() -> None:
    """After an own period that ends mid-month, the next starts at its end, not the 1st."""
    own_end = ts(2025, 3, 15)
    lic = License(
        subscription_id="lic_1",
        practice_id="p",
        status="active",
        lookup_key="aza_basic_monthly",
        customer_id=None,
        customer_email=None,
        period_start=ts(2025, 2, 13),
        period_end=own_end,
    )
    assert current_period(lic, ts(2025, 3, 20), grace_seconds=0) == Period(own_end, ts(2025, 4, 1))
    assert current_period(lic, ts(2025, 4, 2), grace_seconds=0) == Period(
        ts(2025, 4, 1), ts(2025, 5, 1)
    )
