"""The credit facade the gateway's routes, gate and webhook endpoint call.

`CreditService` composes the ledger, the top-up settings, Stripe Checkout,
automatic top-up and webhook handling over one `Database` and one optional
`StripePort`. Deployment choices (dry run, live mode, feature flag, webhook
secret, constants) arrive in a `CreditPolicy` made once when the app is
wired; nothing here reads the environment.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from credit.autotopup import AutoTopup, AutoTopupOutcome
from credit.checkout import Mode, create_setup_checkout, create_topup_checkout
from credit.config import CreditConfig
from credit.errors import CreditError, Refusal, WebhookSignatureError, invalid
from credit.ledger import (
    EventType,
    NewEntry,
    Status,
    admin_item,
    auto_topups_rappen_this_month,
    entries_for_practice,
    extra_credit_micros,
    get_entry,
    history_item,
    insert_entry,
)
from credit.money import (
    InvalidAmount,
    chf_to_internal_usd,
    parse_chf,
    parse_usd,
    rappen_to_chf,
    usd_to_micros,
)
from credit.ports import Database
from credit.stripe_port import StripePort
from credit.topup_settings import TopupSettings, load_settings, save_settings
from credit.webhooks import WebhookHandler

__all__ = [
    "AutoTopupOutcome",
    "CreditError",
    "CreditPolicy",
    "CreditService",
    "WebhookSignatureError",
]

MAX_ADJUSTMENT_USD = Decimal("100000")
MAX_MONTHLY_LIMIT_CHF = Decimal("100000")
MAX_NOTE_CHARS = 500


@dataclass(frozen=True, slots=True)
class CreditPolicy:
    """Deployment choices for credit, fixed when the app is wired."""

    auto_topup_enabled: bool  # AZA_AI_AUTO_TOPUP_ENABLED
    dry_run: bool  # AZA_AI_TOPUP_DRY_RUN
    allow_live: bool  # AZA_AI_TOPUP_ALLOW_LIVE
    live_key: bool  # STRIPE_SECRET_KEY is sk_live_/rk_live_
    webhook_secret: str | None = field(repr=False)  # STRIPE_WEBHOOK_SECRET (never logged)
    config: CreditConfig


class CreditService:
    """Extra credit of practices: ledger, settings, top-ups, Stripe webhooks."""

    def __init__(
        self,
        db: Database,
        *,
        stripe: StripePort | None,
        policy: CreditPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._stripe = stripe
        self._policy = policy
        self._config = policy.config
        self._clock = clock
        self._mode = Mode(
            dry_run=policy.dry_run, live_key=policy.live_key, allow_live=policy.allow_live
        )
        self._auto = AutoTopup(
            db,
            stripe=stripe,
            config=policy.config,
            feature_enabled=policy.auto_topup_enabled,
            dry_run=policy.dry_run,
            live_key=policy.live_key,
            allow_live=policy.allow_live,
            clock=clock,
        )
        self._webhooks = WebhookHandler(
            db,
            stripe=stripe,
            config=policy.config,
            webhook_secret=policy.webhook_secret,
            clock=clock,
        )

    def _now(self) -> int:
        return int(self._clock())

    # -- ledger -------------------------------------------------------------

    async def extra_credit_micros(self, practice_id: str) -> int:
        """Extra credit left, in micro-USD (negative after a refund of spent credit)."""
        async with self._db.read() as conn:
            return await extra_credit_micros(conn, practice_id)

    async def history(self, practice_id: str, *, limit: int = 100) -> list[dict[str, Any]]:
        """The practice's own ledger, newest first, amounts as written, Stripe ids masked."""
        async with self._db.read() as conn:
            entries = await entries_for_practice(conn, practice_id, limit=limit)
        return [history_item(entry) for entry in entries]

    async def admin_ledger(self, practice_id: str, *, limit: int = 500) -> list[dict[str, Any]]:
        """The practice's ledger for operators (ids masked, notes included)."""
        async with self._db.read() as conn:
            entries = await entries_for_practice(conn, practice_id, limit=limit)
        return [admin_item(entry) for entry in entries]

    async def adjust(
        self, practice_id: str, *, amount_usd: Decimal, note: str, actor: str
    ) -> dict[str, Any]:
        """Book an admin adjustment of `amount_usd` (positive or negative) with a note."""
        try:
            usd = parse_usd(amount_usd)
        except InvalidAmount as exc:
            raise invalid("amount_usd", str(exc), "Ungültiger Betrag.") from None
        if usd == 0 or abs(usd) > MAX_ADJUSTMENT_USD:
            raise invalid(
                "amount_usd",
                f"amount_usd must be non-zero and at most {MAX_ADJUSTMENT_USD} in size",
                "Ungültiger Betrag.",
            )
        text = (note or "").strip()
        if not text or len(text) > MAX_NOTE_CHARS:
            raise invalid(
                "note",
                f"note is required (1-{MAX_NOTE_CHARS} characters)",
                "Bitte eine Begründung angeben.",
            )
        async with self._db.transaction(lock=practice_id) as conn:
            ledger_id = await insert_entry(
                conn,
                NewEntry(
                    practice_id=practice_id,
                    event_type=EventType.ADMIN_ADJUSTMENT,
                    status=Status.SUCCEEDED,
                    amount_micros=usd_to_micros(usd),
                    meta={"note": text, "actor": actor},
                ),
                now=self._now(),
            )
            entry = await get_entry(conn, ledger_id)
        assert entry is not None
        return admin_item(entry)

    # -- settings -----------------------------------------------------------

    async def settings_status(self, practice_id: str) -> dict[str, Any]:
        """Auto top-up settings as the practice sees them (never the payment method id)."""
        async with self._db.read() as conn:
            settings = await load_settings(conn, practice_id, self._config)
            this_month = await auto_topups_rappen_this_month(
                conn, practice_id, now=self._now(), zone=self._config.month_timezone
            )
        return _status(settings, this_month)

    async def update_settings(
        self,
        practice_id: str,
        *,
        enabled: bool | None = None,
        topup_amount_chf: Decimal | None = None,
        trigger_below_percent: int | None = None,
        monthly_limit_chf: Decimal | None = None,
    ) -> dict[str, Any]:
        """Change the practice's auto top-up settings; raises CreditError for invalid values.

        Turning it off keeps the saved card; turning it on needs one
        (409 AUTO_TOPUP_NO_PAYMENT_METHOD) and clears a pause.
        """
        config = self._config
        amount: Decimal | None = None
        if topup_amount_chf is not None:
            try:
                amount = parse_chf(topup_amount_chf, what="topup_amount_chf")
            except InvalidAmount as exc:
                raise invalid("topup_amount_chf", str(exc), "Ungültiger Betrag.") from None
            if not config.min_topup_chf <= amount <= config.max_topup_chf:
                raise invalid(
                    "topup_amount_chf",
                    f"topup_amount_chf must be between {config.min_topup_chf} and "
                    f"{config.max_topup_chf} CHF",
                    f"Bitte einen Betrag zwischen {config.min_topup_chf} und "
                    f"{config.max_topup_chf} CHF wählen.",
                )
        if trigger_below_percent is not None and (
            isinstance(trigger_below_percent, bool)
            or not isinstance(trigger_below_percent, int)
            or not 1 <= trigger_below_percent <= 100
        ):
            raise invalid(
                "trigger_below_percent",
                "trigger_below_percent must be a whole number from 1 to 100",
                "Die Schwelle muss zwischen 1 und 100 % liegen.",
            )
        limit: Decimal | None = None
        if monthly_limit_chf is not None:
            try:
                limit = parse_chf(monthly_limit_chf, what="monthly_limit_chf")
            except InvalidAmount as exc:
                raise invalid("monthly_limit_chf", str(exc), "Ungültiges Monatslimit.") from None
            if not 0 < limit <= MAX_MONTHLY_LIMIT_CHF:
                raise invalid(
                    "monthly_limit_chf",
                    f"monthly_limit_chf must be above 0 and at most {MAX_MONTHLY_LIMIT_CHF}",
                    "Ungültiges Monatslimit.",
                )
        async with self._db.transaction(lock=practice_id) as conn:
            settings = await load_settings(conn, practice_id, config)
            if amount is not None:
                settings = replace(
                    settings,
                    topup_amount_chf=amount,
                    internal_credit_usd=chf_to_internal_usd(amount, config.chf_per_internal_usd),
                )
            if trigger_below_percent is not None:
                settings = replace(settings, trigger_below_percent=trigger_below_percent)
            if limit is not None:
                settings = replace(settings, monthly_limit_chf=limit)
            if settings.monthly_limit_chf < settings.topup_amount_chf:
                raise invalid(
                    "monthly_limit_chf",
                    "monthly_limit_chf must be at least topup_amount_chf",
                    "Das Monatslimit muss mindestens einen Aufladebetrag umfassen.",
                )
            if enabled is True:
                if not settings.payment_method_configured:
                    raise CreditError(
                        Refusal.CONFLICT,
                        "AUTO_TOPUP_NO_PAYMENT_METHOD",
                        "auto top-up needs a saved card (customer and payment method)",
                        message_user="Bitte zuerst eine Karte für das automatische Aufladen "
                        "hinterlegen.",
                        param="enabled",
                    )
                settings = replace(settings, auto_topup_enabled=True, paused_reason=None)
            elif enabled is False:
                settings = replace(settings, auto_topup_enabled=False)
            await save_settings(conn, settings, now=self._now())
            this_month = await auto_topups_rappen_this_month(
                conn, practice_id, now=self._now(), zone=self._config.month_timezone
            )
        return _status(settings, this_month)

    # -- Stripe Checkout ------------------------------------------------------

    async def create_topup_checkout(
        self,
        practice_id: str,
        *,
        subscription_id: str | None,
        customer_email: str | None,
        amount_chf: Decimal | str | float | int,
        success_url: str | None = None,
        cancel_url: str | None = None,
    ) -> dict[str, Any]:
        """A Checkout Session for a manual top-up (possible even over the auto monthly limit)."""
        return await create_topup_checkout(
            self._stripe,
            mode=self._mode,
            config=self._config,
            practice_id=practice_id,
            subscription_id=subscription_id,
            customer_email=customer_email,
            amount_chf=amount_chf,
            success_url=success_url,
            cancel_url=cancel_url,
        )

    async def create_setup_checkout(
        self,
        practice_id: str,
        *,
        customer_email: str | None,
        success_url: str | None = None,
        cancel_url: str | None = None,
    ) -> dict[str, Any]:
        """A Checkout Session (setup mode) saving a card for automatic top-ups."""
        async with self._db.read() as conn:
            settings = await load_settings(conn, practice_id, self._config)
        return await create_setup_checkout(
            self._stripe,
            mode=self._mode,
            config=self._config,
            practice_id=practice_id,
            customer_id=settings.stripe_customer_id,
            customer_email=customer_email,
            success_url=success_url,
            cancel_url=cancel_url,
        )

    # -- automatic top-up -----------------------------------------------------

    async def maybe_auto_topup(
        self,
        practice_id: str,
        *,
        available_percent: int,
        subscription_id: str | None,
        trigger: str = "gate",
    ) -> AutoTopupOutcome:
        """Charge one automatic top-up when every guard allows it (see credit/policy.py)."""
        return await self._auto.run(
            practice_id,
            available_percent=available_percent,
            subscription_id=subscription_id,
            trigger=trigger,
        )

    async def reconcile_pending(
        self, practice_id: str | None = None, *, min_age_seconds: int | None = None
    ) -> int:
        """Settle or fail pending automatic top-ups from Stripe; returns how many changed."""
        return await self._auto.reconcile(practice_id, min_age_seconds=min_age_seconds)

    # -- webhooks ---------------------------------------------------------------

    async def handle_webhook(self, payload: bytes, signature: str | None) -> dict[str, Any]:
        """Verify and process one Stripe webhook delivery (raw body, Stripe-Signature header)."""
        return await self._webhooks.handle(payload, signature)


def _status(settings: TopupSettings, auto_this_month_rappen: int) -> dict[str, Any]:
    return {
        "ok": True,
        "auto_topup_enabled": settings.auto_topup_enabled,
        "payment_method_configured": settings.payment_method_configured,
        "topup_amount_chf": float(settings.topup_amount_chf),
        "internal_credit_usd": float(settings.internal_credit_usd),
        "trigger_below_percent": settings.trigger_below_percent,
        "monthly_limit_chf": float(settings.monthly_limit_chf),
        "auto_topups_chf_this_month": float(rappen_to_chf(auto_this_month_rappen)),
        "paused_reason": settings.paused_reason,
    }
