"""The extra-credit ledger (table `ai_credit_ledger`).

Each row is one money event: a purchase (manual or automatic), a failed
attempt (amount 0), a refund (negative), an admin adjustment. A balance is
always the sum of succeeded rows minus the credit that usage consumed; a row,
once written, keeps its amounts (history is never recalculated at today's
rate). Amounts are integer micro-USD (credit) and Rappen (what was paid).

Uniqueness that money depends on lives in the schema: each checkout session
and payment intent credits once, each refund once, one pending automatic
top-up per practice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from budget.money import micros_to_float
from credit.money_sql import EXTRA_CREDIT_SQL
from credit.ports import Connection, Row
from credit.stripe_ids import mask_stripe_reference


class EventType(StrEnum):
    """`event_type` values (the seed's)."""

    TOPUP_PURCHASE = "topup_purchase"
    AUTO_TOPUP_PURCHASE = "auto_topup_purchase"
    FAILED_AUTO_TOPUP = "failed_auto_topup"
    REFUND = "refund"
    ADMIN_ADJUSTMENT = "admin_adjustment"


class Status(StrEnum):
    """`status` values (the seed's)."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


PURCHASE_TYPES = (EventType.TOPUP_PURCHASE.value, EventType.AUTO_TOPUP_PURCHASE.value)

# meta_json keeps notes, never credentials or payment instruments.
_FORBIDDEN_KEY_PARTS = ("secret", "key", "password", "token", "payment_method", "card")
_FORBIDDEN_VALUE_PREFIXES = ("pm_", "card_", "src_", "sk_", "rk_", "pk_", "whsec_", "seti_")


_DROPPED = object()


def _clean_value(value: Any) -> Any:
    """A JSON value for meta_json, or _DROPPED when it could be a secret."""
    if isinstance(value, Mapping):
        return clean_meta(value)
    if isinstance(value, list | tuple):
        return [item for item in map(_clean_value, value) if item is not _DROPPED]
    if isinstance(value, str):
        if value.startswith(_FORBIDDEN_VALUE_PREFIXES) or "_secret_" in value:
            return _DROPPED
        return value
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)


def clean_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """`meta` as JSON values, without keys or values that could be secrets or payment methods.

    Lists stay JSON lists (a refund's `stripe_refunds` is `["re_…"]`, not a
    Python repr of one).
    """
    if not meta:
        return {}
    cleaned: dict[str, Any] = {}
    for raw_key, value in meta.items():
        key = str(raw_key)
        if any(part in key.lower() for part in _FORBIDDEN_KEY_PARTS):
            continue
        kept = _clean_value(value)
        if kept is not _DROPPED:
            cleaned[key] = kept
    return cleaned


@dataclass(frozen=True, slots=True)
class NewEntry:
    """A ledger row to write."""

    practice_id: str
    event_type: EventType
    status: Status
    amount_micros: int = 0
    paid_rappen: int | None = None
    subscription_id: str | None = None
    customer_email: str | None = None
    checkout_session_id: str | None = None
    payment_intent_id: str | None = None
    charge_id: str | None = None
    refund_id: str | None = None
    event_id: str | None = None
    idempotency_key: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A ledger row as stored."""

    id: int
    practice_id: str
    subscription_id: str | None
    customer_email: str | None
    event_type: str
    status: str
    amount_micros: int
    paid_rappen: int | None
    currency: str
    checkout_session_id: str | None
    payment_intent_id: str | None
    charge_id: str | None
    refund_id: str | None
    event_id: str | None
    idempotency_key: str | None
    meta: Mapping[str, Any]
    created_at: int
    updated_at: int
    # The receipt's or invoice's URL Stripe hosts for a paid top-up (migration 011).
    receipt_url: str | None = None


_COLUMNS = (
    "id, practice_id, subscription_id, customer_email, event_type, status, "
    "amount_internal_micro_usd, amount_paid_rappen, currency, stripe_checkout_session_id, "
    "stripe_payment_intent_id, stripe_charge_id, stripe_refund_id, stripe_event_id, "
    "idempotency_key, meta_json, created_at, updated_at, receipt_url"
)


def _entry(row: Row) -> LedgerEntry:
    try:
        meta = json.loads(row["meta_json"] or "{}")
    except ValueError:
        meta = {}
    paid = row["amount_paid_rappen"]
    return LedgerEntry(
        id=int(row["id"]),
        practice_id=str(row["practice_id"]),
        subscription_id=row["subscription_id"],
        customer_email=row["customer_email"],
        event_type=str(row["event_type"]),
        status=str(row["status"]),
        amount_micros=int(row["amount_internal_micro_usd"]),
        paid_rappen=None if paid is None else int(paid),
        currency=str(row["currency"]),
        checkout_session_id=row["stripe_checkout_session_id"],
        payment_intent_id=row["stripe_payment_intent_id"],
        charge_id=row["stripe_charge_id"],
        refund_id=row["stripe_refund_id"],
        event_id=row["stripe_event_id"],
        idempotency_key=row["idempotency_key"],
        meta=meta if isinstance(meta, dict) else {},
        receipt_url=row["receipt_url"],
        created_at=int(row["created_at"]),
        updated_at=int(row["updated_at"]),
    )


async def insert_entry(conn: Connection, entry: NewEntry, *, now: int) -> int:
    """Write `entry`; returns its id. Raises `UniqueViolation` when its Stripe object is booked."""
    new_id = await conn.fetchval(
        "INSERT INTO ai_credit_ledger (practice_id, subscription_id, customer_email, event_type, "
        "status, amount_internal_micro_usd, amount_paid_rappen, currency, "
        "stripe_checkout_session_id, stripe_payment_intent_id, stripe_charge_id, "
        "stripe_refund_id, stripe_event_id, idempotency_key, meta_json, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, 'chf', ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        entry.practice_id,
        entry.subscription_id,
        entry.customer_email,
        entry.event_type.value,
        entry.status.value,
        entry.amount_micros,
        entry.paid_rappen,
        entry.checkout_session_id,
        entry.payment_intent_id,
        entry.charge_id,
        entry.refund_id,
        entry.event_id,
        entry.idempotency_key,
        json.dumps(clean_meta(entry.meta), sort_keys=True),
        now,
        now,
    )
    return int(new_id)


async def get_entry(conn: Connection, ledger_id: int) -> LedgerEntry | None:
    row = await conn.fetchone(f"SELECT {_COLUMNS} FROM ai_credit_ledger WHERE id = ?", ledger_id)
    return None if row is None else _entry(row)


def stripe_object_filter(
    checkout_session_id: str | None,
    payment_intent_id: str | None,
    idempotency_key: str | None = None,
) -> tuple[str, list[str]] | None:
    """SQL matching entries of this checkout session, payment intent or key, with its arguments.

    None when no id is known (nothing can match).
    """
    clauses, args = [], []
    if checkout_session_id:
        clauses.append("stripe_checkout_session_id = ?")
        args.append(checkout_session_id)
    if payment_intent_id:
        clauses.append("stripe_payment_intent_id = ?")
        args.append(payment_intent_id)
    if idempotency_key:
        clauses.append("idempotency_key = ?")
        args.append(idempotency_key)
    if not clauses:
        return None
    return "(" + " OR ".join(clauses) + ")", args


async def find_purchase(
    conn: Connection,
    *,
    checkout_session_id: str | None = None,
    payment_intent_id: str | None = None,
    idempotency_key: str | None = None,
) -> LedgerEntry | None:
    """The (not failed) purchase booked for this checkout session, payment intent or key."""
    found = stripe_object_filter(checkout_session_id, payment_intent_id, idempotency_key)
    if found is None:
        return None
    where, args = found
    row = await conn.fetchone(
        f"SELECT {_COLUMNS} FROM ai_credit_ledger WHERE {where} "
        "AND status <> 'failed' AND event_type IN (?, ?) ORDER BY id LIMIT 1",
        *args,
        *PURCHASE_TYPES,
    )
    return None if row is None else _entry(row)


async def exists_for_checkout(conn: Connection, checkout_session_id: str) -> bool:
    return await find_purchase(conn, checkout_session_id=checkout_session_id) is not None


async def exists_for_payment_intent(conn: Connection, payment_intent_id: str) -> bool:
    return await find_purchase(conn, payment_intent_id=payment_intent_id) is not None


async def entries_for_practice(
    conn: Connection, practice_id: str, *, limit: int = 100
) -> list[LedgerEntry]:
    """The practice's entries, newest first."""
    rows = await conn.fetchall(
        f"SELECT {_COLUMNS} FROM ai_credit_ledger WHERE practice_id = ? "
        "ORDER BY created_at DESC, id DESC LIMIT ?",
        practice_id,
        max(1, min(int(limit), 10_000)),
    )
    return [_entry(row) for row in rows]


async def extra_credit_micros(conn: Connection, practice_id: str) -> int:
    """Extra credit left (micro-USD): succeeded entries minus credit consumed by usage.

    May be negative after a refund of credit that was already used.
    """
    # The money SQL written once (credit/money_sql.py).
    return int(await conn.fetchval(EXTRA_CREDIT_SQL, practice_id, practice_id))


async def pending_auto_topups(
    conn: Connection, practice_id: str | None = None
) -> list[LedgerEntry]:
    """Automatic top-ups still pending (of one practice, or all), oldest first."""
    sql = f"SELECT {_COLUMNS} FROM ai_credit_ledger WHERE event_type = ? AND status = 'pending'"
    args: list[Any] = [EventType.AUTO_TOPUP_PURCHASE.value]
    if practice_id is not None:
        sql += " AND practice_id = ?"
        args.append(practice_id)
    rows = await conn.fetchall(sql + " ORDER BY id", *args)
    return [_entry(row) for row in rows]


async def has_pending_auto_topup(conn: Connection, practice_id: str) -> bool:
    return bool(await pending_auto_topups(conn, practice_id))


async def last_successful_auto_topup_at(conn: Connection, practice_id: str) -> int | None:
    """When (Unix seconds) the practice's latest succeeded automatic top-up was started."""
    value = await conn.fetchval(
        "SELECT MAX(created_at) FROM ai_credit_ledger "
        "WHERE practice_id = ? AND event_type = ? AND status = 'succeeded'",
        practice_id,
        EventType.AUTO_TOPUP_PURCHASE.value,
    )
    return None if value is None else int(value)


def month_start(now: float, zone: str) -> int:
    """Start (Unix seconds) of the calendar month containing `now`, as kept in `zone`.

    Midnight on the 1st in Zurich is 23:00 (winter) or 22:00 (summer) UTC of
    the day before; no zone this project uses changes its clocks at midnight.
    """
    local = datetime.fromtimestamp(now, ZoneInfo(zone))
    return int(local.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())


async def auto_topups_rappen_this_month(
    conn: Connection, practice_id: str, *, now: float, zone: str
) -> int:
    """Rappen of automatic top-ups (succeeded or pending) in this calendar month of `zone`.

    Manual top-ups do not count: the monthly limit caps what is charged
    without a person clicking.
    """
    value = await conn.fetchval(
        "SELECT COALESCE(SUM(amount_paid_rappen), 0) FROM ai_credit_ledger "
        "WHERE practice_id = ? AND event_type = ? AND status IN ('succeeded', 'pending') "
        "AND created_at >= ?",
        practice_id,
        EventType.AUTO_TOPUP_PURCHASE.value,
        month_start(now, zone),
    )
    return int(value or 0)


async def settle_pending(
    conn: Connection, ledger_id: int, *, payment_intent_id: str, event_id: str | None, now: int
) -> bool:
    """Pending automatic top-up → succeeded (credits it). False when it was not pending."""
    changed = await conn.execute(
        "UPDATE ai_credit_ledger SET status = 'succeeded', stripe_payment_intent_id = ?, "
        "stripe_event_id = COALESCE(?, stripe_event_id), updated_at = ? "
        "WHERE id = ? AND status = 'pending'",
        payment_intent_id,
        event_id,
        now,
        ledger_id,
    )
    return changed > 0


async def fail_pending(
    conn: Connection,
    ledger_id: int,
    *,
    payment_intent_id: str | None,
    reason: str,
    now: int,
) -> bool:
    """Pending automatic top-up → `failed_auto_topup`, amount 0. False when it was not pending."""
    entry = await get_entry(conn, ledger_id)
    if entry is None or entry.status != Status.PENDING:
        return False
    meta = dict(entry.meta)
    meta["failure_reason"] = reason
    meta["attempted_internal_micro_usd"] = entry.amount_micros
    changed = await conn.execute(
        "UPDATE ai_credit_ledger SET status = 'failed', event_type = ?, "
        "amount_internal_micro_usd = 0, "
        "stripe_payment_intent_id = COALESCE(?, stripe_payment_intent_id), "
        "meta_json = ?, updated_at = ? WHERE id = ? AND status = 'pending'",
        EventType.FAILED_AUTO_TOPUP.value,
        payment_intent_id,
        json.dumps(clean_meta(meta), sort_keys=True),
        now,
        ledger_id,
    )
    return changed > 0


async def set_pending_payment_intent(
    conn: Connection, ledger_id: int, payment_intent_id: str, *, now: int
) -> None:
    """Remember the PaymentIntent of a still pending top-up (for reconciliation)."""
    await conn.execute(
        "UPDATE ai_credit_ledger SET stripe_payment_intent_id = ?, updated_at = ? "
        "WHERE id = ? AND status = 'pending'",
        payment_intent_id,
        now,
        ledger_id,
    )


def _usd(micros: int) -> float:
    # Presentation only (JSON numbers, as the seed returned them); the exact
    # integer goes alongside.
    return micros_to_float(micros)


def history_item(entry: LedgerEntry) -> dict[str, Any]:
    """An entry as a practice member sees it: amounts as written, Stripe ids masked."""
    return {
        "id": entry.id,
        "created_at": entry.created_at,
        "event_type": entry.event_type,
        "status": entry.status,
        "amount_internal_usd": _usd(entry.amount_micros),
        "amount_internal_micro_usd": entry.amount_micros,
        "amount_paid_chf": None if entry.paid_rappen is None else entry.paid_rappen / 100,
        "amount_paid_rappen": entry.paid_rappen,
        "currency": entry.currency,
        "stripe_payment_reference": mask_stripe_reference(
            entry.payment_intent_id or entry.checkout_session_id
        ),
        "failure_reason": entry.meta.get("failure_reason"),
        "receipt_url": entry.receipt_url,
    }


def admin_item(entry: LedgerEntry) -> dict[str, Any]:
    """An entry as an operator sees it: everything but unmasked Stripe ids."""
    item = history_item(entry)
    item.update(
        {
            "practice_id": entry.practice_id,
            "subscription_id": entry.subscription_id,
            "checkout_session_masked": mask_stripe_reference(entry.checkout_session_id),
            "payment_intent_masked": mask_stripe_reference(entry.payment_intent_id),
            "charge_masked": mask_stripe_reference(entry.charge_id),
            "refund_masked": mask_stripe_reference(entry.refund_id),
            "updated_at": entry.updated_at,
            "meta": dict(entry.meta),
        }
    )
    return item


async def set_receipt_url(conn: Connection, ledger_id: int, url: str, *, now: int) -> int:
    """Keep the receipt's (or invoice's) URL of a paid entry; 1 when it was set now."""
    return await conn.execute(
        "UPDATE ai_credit_ledger SET receipt_url = ?, updated_at = ? "
        "WHERE id = ? AND receipt_url IS NULL",
        url,
        now,
        ledger_id,
    )
