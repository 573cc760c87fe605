"""The `licenses` table: the one store every writer and reader of licenses uses.

A license row is a practice's subscription (its plan's `lookup_key`, status
and period). Three kinds of writers keep it: Stripe's subscription events
(`credit.subscriptions`), and the admin route, CLI and demo (rows of their
own, not `sub_…`). All of them write through `write_license`, one upsert;
the gate reads through `BEST_LICENSE_SQL` (inside its one state query) or
`best_license`.

Stripe does not deliver events in order and retries old deliveries, so a
row keeps the `created` time of the event it last applied
(`stripe_event_created`) and an older event changes nothing. An event as old
as the stored one applies (a retry of the same event writes the same state),
except that it cannot move a canceled or expired subscription back to a live
status: Stripe never does, so at equal times the final status is the newer
one. A write without an event time (admin, CLI, demo) always applies and
keeps the stored event time; the database decides, in the upsert itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from budget.license import USABLE_STATUSES, License
from credit.ports import Connection, Row

# Subscription statuses Stripe never moves a subscription out of.
FINAL_SUBSCRIPTION_STATUSES = ("canceled", "incomplete_expired")
_FINAL_SQL = ", ".join(f"'{status}'" for status in FINAL_SUBSCRIPTION_STATUSES)

# A usable license first (budget.license decides which statuses are), then the latest.
_USABLE_SQL_LIST = ", ".join(f"'{status.value}'" for status in sorted(USABLE_STATUSES))
LICENSE_COLUMNS = (
    "subscription_id, practice_id, status, lookup_key, customer_id, customer_email, "
    "current_period_start, current_period_end"
)
BEST_LICENSE_SQL = f"""
SELECT {LICENSE_COLUMNS}
FROM licenses WHERE practice_id = ?
ORDER BY CASE WHEN status IN ({_USABLE_SQL_LIST}) THEN 0 ELSE 1 END,
         current_period_end DESC
LIMIT 1
"""

# Unknown values (NULL) keep what the row has; the WHERE is the event-order rule above.
_WRITE_SQL = (
    "INSERT INTO licenses (subscription_id, practice_id, customer_id, customer_email, status, "
    "lookup_key, current_period_start, current_period_end, stripe_event_created, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (subscription_id) DO UPDATE SET practice_id = excluded.practice_id, "
    "customer_id = COALESCE(excluded.customer_id, licenses.customer_id), "
    "customer_email = COALESCE(excluded.customer_email, licenses.customer_email), "
    "status = excluded.status, "
    "lookup_key = COALESCE(excluded.lookup_key, licenses.lookup_key), "
    "current_period_start = COALESCE(excluded.current_period_start, "
    "licenses.current_period_start), "
    "current_period_end = COALESCE(excluded.current_period_end, licenses.current_period_end), "
    "stripe_event_created = COALESCE(excluded.stripe_event_created, "
    "licenses.stripe_event_created), "
    "updated_at = excluded.updated_at "
    "WHERE licenses.stripe_event_created IS NULL "
    "OR excluded.stripe_event_created IS NULL "
    "OR excluded.stripe_event_created > licenses.stripe_event_created "
    "OR (excluded.stripe_event_created = licenses.stripe_event_created "
    f"AND (COALESCE(licenses.status, '') NOT IN ({_FINAL_SQL}) "
    f"OR excluded.status IN ({_FINAL_SQL})))"
)


@dataclass(frozen=True, slots=True)
class LicenseWrite:
    """What a writer knows of a license; None keeps what the row has.

    `stripe_event_created`: the `created` time of the Stripe event this comes
    from (None for the admin route, CLI and demo).
    """

    subscription_id: str
    practice_id: str
    status: str
    lookup_key: str | None
    period_start: int | None
    period_end: int | None
    customer_id: str | None = None
    customer_email: str | None = None
    stripe_event_created: int | None = None


async def write_license(conn: Connection, write: LicenseWrite, *, now: int) -> bool:
    """Create or update a license row (keyed by subscription id).

    False when the row holds a newer Stripe event's state (nothing changed).
    """
    changed = await conn.execute(
        _WRITE_SQL,
        write.subscription_id,
        write.practice_id,
        write.customer_id,
        write.customer_email,
        write.status,
        write.lookup_key,
        write.period_start,
        write.period_end,
        write.stripe_event_created,
        now,
    )
    return bool(changed)


def license_from_row(row: Row) -> License:
    """A `License` of a row with `LICENSE_COLUMNS`."""
    return License(
        subscription_id=row["subscription_id"],
        practice_id=row["practice_id"],
        status=row["status"] or "",
        lookup_key=row["lookup_key"] or "",
        customer_id=row["customer_id"],
        customer_email=row["customer_email"],
        period_start=int(row["current_period_start"] or 0),
        period_end=int(row["current_period_end"] or 0),
    )


async def best_license(conn: Connection, practice_id: str) -> License | None:
    """The practice's usable license if it has one, else its latest; None without a row."""
    row = await conn.fetchone(BEST_LICENSE_SQL, practice_id)
    return None if row is None else license_from_row(row)


async def practice_of_subscription(conn: Connection, subscription_id: str) -> str | None:
    """The practice a subscription's license row belongs to, if there is a row."""
    value = await conn.fetchval(
        "SELECT practice_id FROM licenses WHERE subscription_id = ?", subscription_id
    )
    return None if value is None else str(value)
