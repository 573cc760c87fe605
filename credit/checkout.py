"""Stripe Checkout for a manual top-up (mode payment, CHF) and for saving a card (mode setup).

Nothing is written to the ledger here: a top-up is credited when Stripe's
webhook says it was paid (credit/webhooks.py).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from credit.config import CreditConfig
from credit.errors import CreditError, Refusal, invalid
from credit.money import (
    InvalidAmount,
    chf_to_internal_usd,
    chf_to_rappen,
    parse_chf,
    usd_to_micros,
)
from credit.stripe_port import (
    CheckoutRequest,
    CheckoutSessionResult,
    StripeFailure,
    StripePort,
    StripeUnavailable,
)

PURPOSE_TOPUP = "ai_topup"
PURPOSE_SETUP = "ai_topup_setup"
PURPOSE_AUTO_TOPUP = "ai_auto_topup"
# Metadata key of a manual top-up's own reference (set on session and PaymentIntent).
TOPUP_REF_KEY = "aza_topup_ref"


def new_topup_ref() -> str:
    """A fresh reference for one manual top-up: `topup_` and 32 hex digits."""
    return f"topup_{uuid.uuid4().hex}"


@dataclass(frozen=True, slots=True)
class Mode:
    """The deployment's top-up mode (from CreditPolicy)."""

    dry_run: bool
    live_key: bool
    allow_live: bool


def validate_topup_amount(amount_chf: Decimal | str | float | int, config: CreditConfig) -> Decimal:
    """The CHF amount of a manual top-up, or a 422 `INVALID_TOPUP_AMOUNT` saying what is wrong."""
    low, high = config.min_topup_chf, config.max_topup_chf
    hint = f"Bitte einen Betrag zwischen {low} und {high} CHF wählen."
    try:
        chf = parse_chf(amount_chf)
    except InvalidAmount as exc:
        raise invalid("amount_chf", str(exc), hint, "INVALID_TOPUP_AMOUNT") from None
    if chf < low or chf > high:
        raise invalid(
            "amount_chf",
            f"amount_chf must be between {low} and {high} CHF, got {chf}",
            hint,
            "INVALID_TOPUP_AMOUNT",
        )
    return chf


def vat_footer(chf: Decimal, config: CreditConfig) -> str | None:
    """The invoice's VAT line: the VAT included in `chf` at the configured rate (Rappen,
    rounded half up, as Swiss VAT is)."""
    if config.stripe_tax or config.vat_rate <= 0:
        return None
    rate = config.vat_rate
    vat = (chf * rate / (Decimal(100) + rate)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return f"Im Betrag von CHF {chf:.2f} enthalten: {rate} % MWST, CHF {vat:.2f}."


def _guard_live(mode: Mode) -> None:
    if mode.live_key and not mode.allow_live:
        raise CreditError(
            Refusal.FORBIDDEN,
            "LIVE_TOPUP_BLOCKED",
            "a live Stripe key is configured but AZA_AI_TOPUP_ALLOW_LIVE is off",
            message_user="Aufladen ist auf diesem Server noch nicht freigeschaltet.",
        )


def _require(stripe: StripePort | None) -> StripePort:
    if stripe is None:
        raise CreditError(
            Refusal.NOT_CONFIGURED,
            "STRIPE_NOT_CONFIGURED",
            "STRIPE_SECRET_KEY is not set",
            message_user="Zahlungen sind zurzeit nicht verfügbar.",
        )
    return stripe


def _stripe_reference(exc: StripeFailure) -> str:
    """Stripe's request id for support, never Stripe's own text (it can quote keys)."""
    return f" (Stripe request {exc.request_id})" if exc.request_id else ""


def _stripe_error(exc: StripeFailure, what: str) -> CreditError:
    """A Stripe failure as the client sees it: its kind and request id, never Stripe's text."""
    if isinstance(exc, StripeUnavailable):
        return CreditError(
            Refusal.UNAVAILABLE,
            "STRIPE_UNAVAILABLE",
            "Stripe is unavailable; try again later" + _stripe_reference(exc),
            message_user="Stripe ist gerade nicht erreichbar. Bitte später erneut versuchen.",
        )
    return CreditError(
        Refusal.REFUSED_UPSTREAM,
        "STRIPE_REQUEST_FAILED",
        f"Stripe refused {what}" + _stripe_reference(exc),
        message_user="Die Zahlung konnte nicht vorbereitet werden.",
    )


async def _create(stripe: StripePort, request: CheckoutRequest) -> CheckoutSessionResult:
    try:
        return await stripe.create_checkout_session(request)
    except StripeFailure as exc:
        raise _stripe_error(exc, "the checkout session") from exc


def _urls(session: CheckoutSessionResult | None) -> dict[str, Any]:
    url = None if session is None else session.url
    # The seed's clients read any of these names.
    return {"checkout_url": url, "setup_url": url, "url": url}


async def create_topup_checkout(
    stripe: StripePort | None,
    *,
    mode: Mode,
    config: CreditConfig,
    practice_id: str,
    subscription_id: str | None,
    customer_email: str | None,
    amount_chf: Decimal | str | float | int,
    success_url: str | None,
    cancel_url: str | None,
) -> dict[str, Any]:
    """A Checkout Session buying `amount_chf` of credit (or a dry-run answer without URL)."""
    chf = validate_topup_amount(amount_chf, config)
    credit_usd = chf_to_internal_usd(chf, config.chf_per_internal_usd)
    result: dict[str, Any] = {
        "ok": True,
        "dry_run": mode.dry_run,
        "session_id": None,
        "paid_chf": float(chf),
        "internal_credit_usd": float(credit_usd),
        "paid_rappen": chf_to_rappen(chf),
        "internal_credit_micro_usd": usd_to_micros(credit_usd),
        **_urls(None),
    }
    if mode.dry_run:
        return result
    _guard_live(mode)
    metadata = {
        "aza_purpose": PURPOSE_TOPUP,
        # One reference on the session and its PaymentIntent alike: the
        # webhooks of one payment find each other's entry by it even when
        # the session's event names no PaymentIntent (credit/webhooks.py).
        TOPUP_REF_KEY: new_topup_ref(),
        "practice_id": practice_id,
        "subscription_id": subscription_id or "",
        "internal_credit_usd": str(credit_usd),
        "paid_chf": str(chf),
    }
    port = _require(stripe)
    tax_rate_id = None
    if config.vat_rate > 0 and not config.stripe_tax:
        try:
            tax_rate_id = await port.vat_tax_rate(config.vat_rate)
        except StripeFailure as exc:
            raise _stripe_error(exc, "the VAT tax rate") from exc
    session = await _create(
        port,
        CheckoutRequest(
            mode="payment",
            success_url=success_url or config.topup_success_url,
            cancel_url=cancel_url or config.cancel_url,
            metadata=metadata,
            currency=config.currency,
            amount_rappen=chf_to_rappen(chf),
            product_name="AzA KI-Zusatzguthaben",
            customer_email=customer_email,
            client_reference_id=practice_id,
            tax_rate_id=tax_rate_id,
            automatic_tax=config.stripe_tax,
            invoice_footer=vat_footer(chf, config),
        ),
    )
    result.update(session_id=session.id, **_urls(session))
    return result


async def create_setup_checkout(
    stripe: StripePort | None,
    *,
    mode: Mode,
    config: CreditConfig,
    practice_id: str,
    customer_id: str | None,
    customer_email: str | None,
    success_url: str | None,
    cancel_url: str | None,
) -> dict[str, Any]:
    """A Checkout Session (mode setup) saving a card for automatic top-ups."""
    result: dict[str, Any] = {
        "ok": True,
        "dry_run": mode.dry_run,
        "session_id": None,
        **_urls(None),
    }
    if mode.dry_run:
        return result
    _guard_live(mode)
    session = await _create(
        _require(stripe),
        CheckoutRequest(
            mode="setup",
            success_url=success_url or config.setup_success_url,
            cancel_url=cancel_url or config.cancel_url,
            metadata={"aza_purpose": PURPOSE_SETUP, "practice_id": practice_id},
            currency=config.currency,
            customer_id=customer_id,
            customer_email=customer_email,
            client_reference_id=practice_id,
        ),
    )
    result.update(session_id=session.id, **_urls(session))
    return result
