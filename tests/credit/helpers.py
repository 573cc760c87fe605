"""Test helpers for credit: services, Stripe over respx, signed webhooks, seed-style rows."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from dataclasses import replace
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

import httpx

from credit.config import CreditConfig
from credit.ledger import EventType, NewEntry, Status, insert_entry
from credit.ports import Database
from credit.service import CreditPolicy, CreditService
from credit.stripe_port import StripeClientAdapter
from credit.topup_settings import TopupSettings, save_settings

# The shipped credit config without VAT: what the credit tests were written against
# (the receipts tests set their own rate).
CREDIT = replace(CreditConfig.defaults(), vat_rate=Decimal("0"))

STRIPE_BASE = "https://stripe.test"

# stripe-python's HTTPXClient posts its form body as `data=<str>`, which httpx
# 0.28 deprecates (the request is still correct); pytest turns warnings into
# errors, so modules that talk to the faked Stripe ignore exactly this one.
STRIPE_HTTPX_DEPRECATION = "ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning"
WEBHOOK_SECRET = "whsec_test_credit_0123456789"
PRACTICE = "prac_top"
SUBSCRIPTION = "sub_top"


class Clock:
    """A settable clock (Unix seconds) for services under test."""

    def __init__(self, now: float | None = None) -> None:
        self.now = float(now if now is not None else time.time())

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def policy(
    *,
    auto: bool = True,
    dry_run: bool = False,
    allow_live: bool = False,
    live_key: bool = False,
    secret: str | None = WEBHOOK_SECRET,
) -> CreditPolicy:
    return CreditPolicy(
        auto_topup_enabled=auto,
        dry_run=dry_run,
        allow_live=allow_live,
        live_key=live_key,
        webhook_secret=secret,
        config=CREDIT,
    )


def stripe_adapter() -> StripeClientAdapter:
    """The real adapter, pointed at the respx-faked Stripe host, without client retries."""
    return StripeClientAdapter(
        "sk_test_credit_fake", api_base=STRIPE_BASE, timeout_seconds=5, max_network_retries=0
    )


def service(
    db: Database,
    *,
    stripe: Any = None,
    clock: Clock | None = None,
    **policy_args: Any,
) -> CreditService:
    return CreditService(db, stripe=stripe, policy=policy(**policy_args), clock=clock or Clock())


def form(request: httpx.Request) -> dict[str, str]:
    """The form-encoded body Stripe received, flattened (`metadata[aza_purpose]` → value)."""
    parsed = parse_qs(request.content.decode(), keep_blank_values=True)
    return {key: values[-1] for key, values in parsed.items()}


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, *, timestamp: int | None = None) -> str:
    """A Stripe-Signature header computed like Stripe does (HMAC-SHA256 of "t.payload")."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def event(
    event_type: str, obj: dict[str, Any], *, event_id: str | None = None, created: int | None = None
) -> bytes:
    """A Stripe event body (bytes, as it arrives), `created` now unless given."""
    return json.dumps(
        {
            "id": event_id or f"evt_{uuid.uuid4().hex[:16]}",
            "object": "event",
            "type": event_type,
            "created": int(time.time()) if created is None else created,
            "data": {"object": obj},
        }
    ).encode()


def topup_meta(
    *, practice: str = PRACTICE, credit: str = "20", paid: str = "30", purpose: str = "ai_topup"
) -> dict[str, str]:
    return {
        "aza_purpose": purpose,
        "practice_id": practice,
        "subscription_id": SUBSCRIPTION,
        "internal_credit_usd": credit,
        "paid_chf": paid,
    }


def payment_intent_json(
    pi_id: str = "pi_auto_1",
    *,
    status: str = "succeeded",
    amount: int = 3000,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "id": pi_id,
        "object": "payment_intent",
        "status": status,
        "amount": amount,
        "amount_received": amount if status == "succeeded" else 0,
        "currency": "chf",
        "customer": "cus_x",
        "metadata": metadata or {},
    }


def card_error(
    code: str, *, decline_code: str | None = None, pi_id: str = "pi_declined"
) -> httpx.Response:
    """Stripe's 402 answer to a declined off-session confirmation."""
    error: dict[str, Any] = {
        "type": "card_error",
        "code": code,
        "message": "Your card was declined.",
        "payment_intent": {
            "id": pi_id,
            "object": "payment_intent",
            "status": "requires_payment_method",
        },
    }
    if decline_code:
        error["decline_code"] = decline_code
    return httpx.Response(402, json={"error": error})


async def add_license(
    db: Database, *, practice: str = PRACTICE, subscription: str = SUBSCRIPTION
) -> None:
    """The seed's license row: prac_top / sub_top, active, aza_basic_monthly."""
    now = int(time.time())
    async with db.transaction(lock=practice) as conn:
        await conn.execute(
            "INSERT INTO licenses (subscription_id, customer_id, status, lookup_key, "
            "allowed_users, devices_per_user, customer_email, current_period_end, "
            "current_period_start, "
            "updated_at, license_key, practice_id) VALUES (?, 'cus_x', 'active', "
            "'aza_basic_monthly', 1, 2, 'cli@example.test', ?, ?, ?, 'KEY', ?)",
            subscription,
            now + 86_400 * 29,
            now - 86_400,
            now,
            practice,
        )


async def book(
    db: Database,
    *,
    practice: str = PRACTICE,
    event_type: EventType = EventType.TOPUP_PURCHASE,
    status: Status = Status.SUCCEEDED,
    usd: str = "20",
    chf: str | None = "30",
    created_at: int | None = None,
    **ids: Any,
) -> int:
    """Write a ledger row directly (the seed's insert_ledger_event)."""
    from credit.money import chf_to_rappen, usd_to_micros

    entry = NewEntry(
        practice_id=practice,
        event_type=event_type,
        status=status,
        amount_micros=usd_to_micros(Decimal(usd)),
        paid_rappen=None if chf is None else chf_to_rappen(Decimal(chf)),
        subscription_id=SUBSCRIPTION if practice == PRACTICE else f"sub_{practice}",
        **ids,
    )
    async with db.transaction(lock=practice) as conn:
        return await insert_entry(conn, entry, now=created_at or int(time.time()))


async def save(
    db: Database,
    *,
    enabled: bool = True,
    amount: str = "30",
    credit: str = "10",
    trigger: int = 10,
    limit: str = "300",
    customer: str | None = "cus_x",
    payment_method: str | None = "pm_test",
    practice: str = PRACTICE,
) -> TopupSettings:
    """Save top-up settings directly (the seed's save_topup_settings)."""
    settings = TopupSettings(
        practice_id=practice,
        auto_topup_enabled=enabled,
        topup_amount_chf=Decimal(amount),
        internal_credit_usd=Decimal(credit),
        trigger_below_percent=trigger,
        monthly_limit_chf=Decimal(limit),
        stripe_customer_id=customer,
        default_payment_method_id=payment_method,
    )
    async with db.transaction(lock=practice) as conn:
        await save_settings(conn, settings, now=int(time.time()))
    return settings


async def count(db: Database, sql: str, *args: Any) -> int:
    async with db.read() as conn:
        return int(await conn.fetchval(sql, *args))
