"""Automatic top-up: charge the saved card off-session when credit runs low.

The sequence that makes "no path charges twice or credits twice" hold:

1. In one transaction locked on the practice: judge the guards
   (credit/policy.py) and write a `pending` ledger entry. The schema allows
   one pending automatic top-up per practice, so a second gateway instance
   racing this one gets `UniqueViolation` and answers "pending_auto_topup".
2. Outside any transaction: create the PaymentIntent (confirm, off_session)
   with an idempotency key derived from that entry. Stripe returns the same
   PaymentIntent for the same key, so a retry never charges again.
3. Settle the entry: succeeded (credited), failed (`failed_auto_topup`,
   amount 0, auto top-up paused, card kept), or left pending when Stripe's
   answer is unknown (timeout, 5xx) — `reconcile()` finishes it later.

Settling is a conditional UPDATE of a pending row, so the webhook for the
same PaymentIntent and this code can race and still credit once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from credit.checkout import PURPOSE_AUTO_TOPUP
from credit.config import CreditConfig
from credit.ledger import (
    EventType,
    LedgerEntry,
    NewEntry,
    Status,
    auto_topups_rappen_this_month,
    fail_pending,
    get_entry,
    insert_entry,
    last_successful_auto_topup_at,
    pending_auto_topups,
    set_pending_payment_intent,
    settle_pending,
)
from credit.money import micros_to_usd, rappen_to_chf
from credit.policy import ERROR_CODES, Action, AutoTopupFacts, Reason, decide_auto_topup
from credit.ports import Connection, Database, UniqueViolation
from credit.receipts import keep_receipt
from credit.stripe_port import (
    AuthenticationRequired,
    CardDeclined,
    PaymentIntentRequest,
    PaymentIntentResult,
    StripeFailure,
    StripePort,
    StripeRequestFailed,
    StripeUnavailable,
)
from credit.topup_settings import load_settings, save_settings

log = logging.getLogger("credit.autotopup")

# A pending entry whose PaymentIntent id we never learned is only re-sent
# after this long: a younger one may still be in flight from another
# instance, and re-sending it would be a second request (harmless, same
# idempotency key, but noise and a 409 for the original).
RECONCILE_GRACE_SECONDS = 120
# Stripe keeps idempotency keys for 24 h; after that a re-send could charge
# anew, so an entry this old without a known PaymentIntent is failed instead
# (its webhook still credits it if the payment did go through).
IDEMPOTENCY_KEY_LIFETIME_SECONDS = 23 * 3600

_FAILED_STATUSES = ("requires_action", "requires_payment_method", "canceled")


@dataclass(frozen=True, slots=True)
class AutoTopupOutcome:
    """What one automatic top-up attempt did.

    `ok` is true when nothing went wrong (charged, dry run, or still
    processing); every outcome that did not charge has a `reason` and an
    upper-case `error_code`.
    """

    ok: bool
    charged: bool
    dry_run: bool
    paused: bool
    reason: str | None
    error_code: str | None
    credited_micros: int = 0
    ledger_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "charged": self.charged,
            "dry_run": self.dry_run,
            "paused": self.paused,
            "reason": self.reason,
            "error_code": self.error_code,
            "credited_micro_usd": self.credited_micros,
            "credited_usd": float(micros_to_usd(self.credited_micros)),
            "ledger_id": self.ledger_id,
        }


def _not_charged(
    reason: Reason,
    *,
    ok: bool = False,
    dry_run: bool = False,
    paused: bool = False,
    ledger_id: int | None = None,
) -> AutoTopupOutcome:
    return AutoTopupOutcome(
        ok=ok,
        charged=False,
        dry_run=dry_run,
        paused=paused,
        reason=reason.value,
        error_code=ERROR_CODES[reason],
        ledger_id=ledger_id,
    )


@dataclass(frozen=True, slots=True)
class _Charge:
    """A pending entry and the PaymentIntent that pays it."""

    ledger_id: int
    idempotency_key: str
    request: PaymentIntentRequest
    credit_micros: int


class AutoTopup:
    """Runs automatic top-ups and reconciles the ones left pending."""

    def __init__(
        self,
        db: Database,
        *,
        stripe: StripePort | None,
        config: CreditConfig,
        feature_enabled: bool,
        dry_run: bool,
        live_key: bool,
        allow_live: bool,
        clock: Callable[[], float],
    ) -> None:
        self._db = db
        self._stripe = stripe
        self._config = config
        self._feature_enabled = feature_enabled
        self._dry_run = dry_run
        self._live_key = live_key
        self._allow_live = allow_live
        self._clock = clock

    def _now(self) -> int:
        return int(self._clock())

    async def run(
        self,
        practice_id: str,
        *,
        available_percent: int,
        subscription_id: str | None,
        trigger: str,
    ) -> AutoTopupOutcome:
        """Charge one automatic top-up for the practice if every guard allows it."""
        if self._stripe is not None and not self._dry_run:
            # Finish what an earlier attempt left open before judging anew.
            await self.reconcile(practice_id)
        try:
            async with self._db.transaction(lock=practice_id) as conn:
                started = await self._start(
                    conn,
                    practice_id,
                    available_percent=available_percent,
                    subscription_id=subscription_id,
                    trigger=trigger,
                )
        except UniqueViolation:
            # Another instance wrote its pending entry first.
            return _not_charged(Reason.PENDING)
        if isinstance(started, AutoTopupOutcome):
            return started
        return await self._charge(practice_id, started)

    async def _start(
        self,
        conn: Connection,
        practice_id: str,
        *,
        available_percent: int,
        subscription_id: str | None,
        trigger: str,
    ) -> AutoTopupOutcome | _Charge:
        now = self._now()
        settings = await load_settings(conn, practice_id, self._config)
        facts = AutoTopupFacts(
            settings_enabled=settings.auto_topup_enabled,
            has_customer=bool(settings.stripe_customer_id),
            has_payment_method=bool(settings.default_payment_method_id),
            trigger_below_percent=settings.trigger_below_percent,
            available_percent=available_percent,
            charge_rappen=settings.topup_amount_rappen,
            monthly_limit_rappen=settings.monthly_limit_rappen,
            auto_topups_this_month_rappen=await auto_topups_rappen_this_month(
                conn, practice_id, now=now, zone=self._config.month_timezone
            ),
            pending=bool(await pending_auto_topups(conn, practice_id)),
            last_success_at=await last_successful_auto_topup_at(conn, practice_id),
            now=now,
            cooldown_seconds=self._config.auto_topup_cooldown_seconds,
            feature_enabled=self._feature_enabled,
            dry_run=self._dry_run,
            live_key=self._live_key,
            allow_live=self._allow_live,
            stripe_configured=self._stripe is not None,
        )
        decision = decide_auto_topup(facts)
        if decision.action is Action.DRY_RUN:
            assert decision.reason is not None
            return _not_charged(decision.reason, ok=True, dry_run=True)
        if decision.action is Action.SKIP:
            assert decision.reason is not None
            return _not_charged(decision.reason)
        assert settings.stripe_customer_id and settings.default_payment_method_id
        subscription_id, email = await _license_of(conn, practice_id, subscription_id)
        ledger_id = await insert_entry(
            conn,
            NewEntry(
                practice_id=practice_id,
                event_type=EventType.AUTO_TOPUP_PURCHASE,
                status=Status.PENDING,
                amount_micros=settings.internal_credit_micros,
                paid_rappen=settings.topup_amount_rappen,
                subscription_id=subscription_id,
                customer_email=email,
                meta={"aza_purpose": PURPOSE_AUTO_TOPUP, "trigger": trigger},
            ),
            now=now,
        )
        key = f"aza_auto_topup_{ledger_id}_{uuid.uuid4().hex[:16]}"
        await conn.execute(
            "UPDATE ai_credit_ledger SET idempotency_key = ? WHERE id = ?", key, ledger_id
        )
        request = PaymentIntentRequest(
            amount_rappen=settings.topup_amount_rappen,
            currency=self._config.currency,
            customer_id=settings.stripe_customer_id,
            payment_method_id=settings.default_payment_method_id,
            metadata={
                "aza_purpose": PURPOSE_AUTO_TOPUP,
                "practice_id": practice_id,
                "subscription_id": subscription_id or "",
                "internal_credit_usd": str(settings.internal_credit_usd),
                "paid_chf": str(settings.topup_amount_chf),
                "aza_ledger_id": str(ledger_id),
            },
            receipt_email=email,
            description="AzA KI-Zusatzguthaben (automatisch)",
        )
        return _Charge(ledger_id, key, request, settings.internal_credit_micros)

    async def _charge(self, practice_id: str, charge: _Charge) -> AutoTopupOutcome:
        assert self._stripe is not None  # the policy does not charge without Stripe
        try:
            intent = await self._stripe.create_payment_intent(
                charge.request, idempotency_key=charge.idempotency_key
            )
        except StripeUnavailable as exc:
            log.warning(
                "auto top-up %s: Stripe unavailable, left pending: %s", charge.ledger_id, exc
            )
            return _not_charged(Reason.STRIPE_UNAVAILABLE, ledger_id=charge.ledger_id)
        except StripeFailure as exc:
            return await self._fail(
                practice_id, charge.ledger_id, exc.payment_intent_id, _reason(exc)
            )
        return await self._apply(practice_id, charge.ledger_id, intent)

    async def _apply(
        self, practice_id: str, ledger_id: int, intent: PaymentIntentResult
    ) -> AutoTopupOutcome:
        """Settle the pending entry from the PaymentIntent's status."""
        if intent.status == "succeeded":
            async with self._db.transaction(lock=practice_id) as conn:
                await settle_pending(
                    conn, ledger_id, payment_intent_id=intent.id, event_id=None, now=self._now()
                )
                entry = await get_entry(conn, ledger_id)
            credited = entry.amount_micros if entry and entry.status == Status.SUCCEEDED else 0
            if credited and intent.latest_charge_id:
                await keep_receipt(
                    self._db,
                    self._stripe,
                    practice_id=practice_id,
                    charge_id=intent.latest_charge_id,
                    ledger_id=ledger_id,
                    clock=self._clock,
                )
            return AutoTopupOutcome(
                ok=True,
                charged=True,
                dry_run=False,
                paused=False,
                reason=None,
                error_code=None,
                credited_micros=credited,
                ledger_id=ledger_id,
            )
        if intent.status in _FAILED_STATUSES:
            reason = (
                Reason.REQUIRES_ACTION
                if intent.status == "requires_action"
                else Reason.PAYMENT_FAILED
            )
            return await self._fail(practice_id, ledger_id, intent.id, reason)
        # processing and friends: the webhook or the next reconcile settles it.
        async with self._db.transaction(lock=practice_id) as conn:
            await set_pending_payment_intent(conn, ledger_id, intent.id, now=self._now())
        return _not_charged(Reason.PROCESSING, ok=True, ledger_id=ledger_id)

    async def _fail(
        self, practice_id: str, ledger_id: int, payment_intent_id: str | None, reason: Reason
    ) -> AutoTopupOutcome:
        async with self._db.transaction(lock=practice_id) as conn:
            failed = await fail_pending(
                conn,
                ledger_id,
                payment_intent_id=payment_intent_id,
                reason=reason.value,
                now=self._now(),
            )
            if failed:
                await pause(
                    conn, practice_id, _paused_reason(reason), self._config, now=self._now()
                )
        log.info("auto top-up %s failed (%s); auto top-up paused", ledger_id, reason.value)
        return _not_charged(reason, paused=True, ledger_id=ledger_id)

    async def reconcile(
        self, practice_id: str | None = None, *, min_age_seconds: int | None = None
    ) -> int:
        """Settle or fail pending automatic top-ups from Stripe's view; returns how many changed.

        Stripe calls happen outside any transaction; each settle is its own
        short transaction.
        """
        if self._stripe is None:
            return 0
        grace = RECONCILE_GRACE_SECONDS if min_age_seconds is None else min_age_seconds
        async with self._db.read() as conn:
            pending = await pending_auto_topups(conn, practice_id)
        changed = 0
        for entry in pending:
            if await self._reconcile_one(entry, grace):
                changed += 1
        return changed

    async def _reconcile_one(self, entry: LedgerEntry, grace: int) -> bool:
        assert self._stripe is not None
        age = self._now() - entry.created_at
        try:
            if entry.payment_intent_id:
                intent = await self._stripe.retrieve_payment_intent(entry.payment_intent_id)
            elif age < grace:
                return False
            elif age > IDEMPOTENCY_KEY_LIFETIME_SECONDS or not entry.idempotency_key:
                outcome = await self._fail(
                    entry.practice_id, entry.id, None, Reason.STRIPE_UNAVAILABLE
                )
                return outcome.paused
            else:
                request = await self._rebuild_request(entry)
                if request is None:
                    return False
                intent = await self._stripe.create_payment_intent(
                    request, idempotency_key=entry.idempotency_key
                )
        except StripeUnavailable:
            return False
        except StripeRequestFailed as exc:
            if exc.code == "idempotency_error":
                log.warning("auto top-up %s: idempotency conflict, left pending", entry.id)
                return False
            await self._fail(entry.practice_id, entry.id, exc.payment_intent_id, _reason(exc))
            return True
        except CardDeclined as exc:
            await self._fail(entry.practice_id, entry.id, exc.payment_intent_id, _reason(exc))
            return True
        outcome = await self._apply(entry.practice_id, entry.id, intent)
        return outcome.charged or outcome.paused

    async def _rebuild_request(self, entry: LedgerEntry) -> PaymentIntentRequest | None:
        """The PaymentIntent request of a pending entry (the same parameters as the first time)."""
        async with self._db.read() as conn:
            settings = await load_settings(conn, entry.practice_id, self._config)
        if not (settings.stripe_customer_id and settings.default_payment_method_id):
            return None
        paid = entry.paid_rappen or 0
        return PaymentIntentRequest(
            amount_rappen=paid,
            currency=self._config.currency,
            customer_id=settings.stripe_customer_id,
            payment_method_id=settings.default_payment_method_id,
            metadata={
                "aza_purpose": PURPOSE_AUTO_TOPUP,
                "practice_id": entry.practice_id,
                "subscription_id": entry.subscription_id or "",
                "internal_credit_usd": str(micros_to_usd(entry.amount_micros)),
                "paid_chf": str(rappen_to_chf(paid)),
                "aza_ledger_id": str(entry.id),
            },
            receipt_email=entry.customer_email,
            description="AzA KI-Zusatzguthaben (automatisch)",
        )


def _reason(exc: StripeFailure) -> Reason:
    if isinstance(exc, AuthenticationRequired):
        return Reason.REQUIRES_ACTION
    return Reason.PAYMENT_FAILED


def _paused_reason(reason: Reason) -> str:
    return ERROR_CODES[reason]


async def pause(
    conn: Connection, practice_id: str, paused_reason: str, config: CreditConfig, *, now: int
) -> None:
    """Switch automatic top-up off after a failure; the saved card stays."""
    settings = await load_settings(conn, practice_id, config)
    await save_settings(
        conn, replace(settings, auto_topup_enabled=False, paused_reason=paused_reason), now=now
    )


async def _license_of(
    conn: Connection, practice_id: str, subscription_id: str | None
) -> tuple[str | None, str | None]:
    """Subscription id and customer email for the ledger entry (from `licenses`)."""
    if subscription_id:
        row = await conn.fetchone(
            "SELECT subscription_id, customer_email FROM licenses WHERE subscription_id = ?",
            subscription_id,
        )
    else:
        row = await conn.fetchone(
            "SELECT subscription_id, customer_email FROM licenses WHERE practice_id = ? "
            "ORDER BY CASE WHEN status IN ('active', 'trialing', 'past_due') THEN 0 ELSE 1 END, "
            "current_period_end DESC LIMIT 1",
            practice_id,
        )
    if row is None:
        return subscription_id, None
    return subscription_id or row["subscription_id"], row["customer_email"]
