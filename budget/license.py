"""Licenses and the budget period they grant (unix seconds, UTC)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum


class LicenseStatus(StrEnum):
    """Stripe subscription statuses a license can have."""

    ACTIVE = "active"
    TRIALING = "trialing"
    PAST_DUE = "past_due"
    CANCELED = "canceled"
    UNPAID = "unpaid"
    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    PAUSED = "paused"


# Statuses that allow AI use; past_due keeps working while Stripe retries the payment.
USABLE_STATUSES = frozenset({LicenseStatus.ACTIVE, LicenseStatus.TRIALING, LicenseStatus.PAST_DUE})


@dataclass(frozen=True, slots=True)
class License:
    """A practice's license; period_start/period_end in unix seconds."""

    subscription_id: str
    practice_id: str
    status: str
    lookup_key: str
    customer_id: str | None
    customer_email: str | None
    period_start: int
    period_end: int

    @property
    def stripe_driven(self) -> bool:
        """True when Stripe keeps this license's period current (a `sub_` subscription)."""
        return self.subscription_id.startswith("sub_")


class LicenseProblem(StrEnum):
    """Why a practice has no budget period now (the seed's error codes)."""

    MISSING = "LICENSE_MISSING"
    INACTIVE = "LICENSE_INACTIVE"
    EXPIRED = "LICENSE_EXPIRED"


@dataclass(frozen=True, slots=True)
class Period:
    """A budget period [start, end) in unix seconds."""

    start: int
    end: int


def calendar_month(now: int) -> Period:
    """The UTC calendar month containing `now` (unix seconds): [first of month, first of next)."""
    moment = datetime.fromtimestamp(now, UTC)
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        end = start.replace(year=start.year + 1, month=1)
    else:
        end = start.replace(month=start.month + 1)
    return Period(int(start.timestamp()), int(end.timestamp()))


def current_period(lic: License | None, now: int, *, grace_seconds: int) -> Period | LicenseProblem:
    """The budget period `lic` grants at `now` (unix seconds), or why there is none.

    A Stripe-driven license uses its Stripe period and keeps it for
    `grace_seconds` past its end while the renewal webhook arrives; any other
    license uses its own period when `now` is inside it, else the UTC calendar
    month — starting no earlier than the end of its own period, so the usage
    of one moment is never counted in two periods.
    """
    if lic is None:
        return LicenseProblem.MISSING
    if lic.status not in USABLE_STATUSES:
        return LicenseProblem.INACTIVE
    if lic.stripe_driven:
        if now <= lic.period_end + grace_seconds:
            return Period(lic.period_start, lic.period_end)
        return LicenseProblem.EXPIRED
    if lic.period_start <= now < lic.period_end:
        return Period(lic.period_start, lic.period_end)
    month = calendar_month(now)
    if lic.period_start <= month.start < lic.period_end <= now:
        return Period(lic.period_end, month.end)
    return month
