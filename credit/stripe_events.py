"""A Stripe webhook event, parsed once into typed values.

Stripe sends references as bare ids, expanded objects or (from some
integrations) JSON strings of objects; amounts as integers or not at all;
metadata as strings. `parse_event` reads all of that once, where the
payload enters: the handlers see only the frozen values below, never the raw
mapping.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from credit.checkout import TOPUP_REF_KEY
from credit.money import InvalidAmount, chf_to_rappen, parse_chf, parse_usd, usd_to_micros
from credit.stripe_ids import normalize_stripe_id


def get(obj: Any, key: str) -> Any:
    """`obj[key]` for dicts, JSON strings of dicts and objects with attributes; else None."""
    if obj is None:
        return None
    if isinstance(obj, str):
        if not obj.strip().startswith("{"):
            return None
        try:
            obj = json.loads(obj)
        except ValueError:
            return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def metadata_of(obj: Any) -> dict[str, str]:
    """An object's metadata as strings (None values dropped)."""
    raw = get(obj, "metadata")
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): str(v) for k, v in raw.items() if v is not None}


def int_or_none(value: Any) -> int | None:
    """An integer field, or None when absent or not a number (booleans are not)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class TopupMeta:
    """The metadata our checkout and PaymentIntents carry, parsed exactly."""

    practice_id: str
    subscription_id: str | None
    credit_micros: int
    paid_rappen: int
    # A manual top-up's ledger key (`topup:<aza_topup_ref>`), when it carries a reference.
    purchase_key: str | None = None


def purchase_key(metadata: Mapping[str, str]) -> str | None:
    """The ledger key of the manual top-up these metadata carry the reference of, or None."""
    return _purchase_key(metadata)


def _purchase_key(metadata: Mapping[str, str]) -> str | None:
    ref = metadata.get(TOPUP_REF_KEY) or ""
    if not (0 < len(ref) <= 64 and ref.isascii() and ref.replace("_", "").isalnum()):
        return None
    return f"topup:{ref}"


def parse_topup_meta(metadata: Mapping[str, str]) -> TopupMeta | None:
    """Practice, credit and price from Stripe metadata; None when any is missing or invalid."""
    practice_id = (metadata.get("practice_id") or "").strip()
    if not practice_id:
        return None
    try:
        credit = parse_usd(metadata.get("internal_credit_usd", ""), what="internal_credit_usd")
        paid = parse_chf(metadata.get("paid_chf", ""), what="paid_chf")
    except InvalidAmount:
        return None
    if credit <= 0 or paid <= 0:
        return None
    return TopupMeta(
        practice_id=practice_id,
        subscription_id=(metadata.get("subscription_id") or None),
        credit_micros=usd_to_micros(credit),
        paid_rappen=chf_to_rappen(paid),
        purchase_key=_purchase_key(metadata),
    )


# -- the objects events carry ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckoutSession:
    """A Checkout Session (a manual top-up's payment, or a card setup)."""

    id: str | None  # cs_…
    payment_intent_id: str | None
    payment_status: str
    amount_total: int | None  # Rappen
    currency: str | None
    customer_id: str | None
    # The setup's SetupIntent: its id when Stripe sent only the id (fetched
    # before the transaction), else what the embedded object says.
    setup_intent_id: str | None
    setup_payment_method_id: str | None
    setup_customer_id: str | None
    # The invoice Checkout made for a paid top-up (invoice_creation), when it did.
    invoice_id: str | None = None


@dataclass(frozen=True, slots=True)
class PaymentIntent:
    id: str | None  # pi_…
    amount_received: int | None  # Rappen
    currency: str | None
    status: str | None
    ledger_id: int | None  # `aza_ledger_id` metadata: the pending entry it pays
    error_code: Any  # last_payment_error's decline_code, else its code


@dataclass(frozen=True, slots=True)
class SetupIntent:
    id: str | None  # seti_…
    customer_id: str | None
    payment_method_id: str | None


@dataclass(frozen=True, slots=True)
class Charge:
    id: str | None  # ch_… or py_…
    payment_intent_id: str | None
    amount_refunded: int | None  # Rappen, cumulative
    refund_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str | None  # sub_…
    customer_id: str | None
    status: str
    lookup_key: str | None  # the plan, from the first item's price
    period_start: int | None
    period_end: int | None


StripeObject = CheckoutSession | PaymentIntent | SetupIntent | Charge | Subscription | None


@dataclass(frozen=True, slots=True)
class StripeEvent:
    """One webhook event: its id, type, when Stripe made it, its object's metadata and object.

    `object` is None for event types the gateway does not handle.
    """

    id: str
    type: str
    created: int | None
    metadata: Mapping[str, str]
    object: StripeObject

    @property
    def purpose(self) -> str | None:
        """The `aza_purpose` our checkouts and PaymentIntents carry."""
        return self.metadata.get("aza_purpose")

    @property
    def practice_id(self) -> str | None:
        return self.metadata.get("practice_id") or None

    @property
    def topup(self) -> TopupMeta | None:
        """The top-up's practice, credit and price, when the metadata has them all."""
        return parse_topup_meta(self.metadata)


def parse_checkout_session(obj: Mapping[str, Any]) -> CheckoutSession:
    intent = obj.get("setup_intent")
    bare = isinstance(intent, str) and intent.startswith("seti_")
    return CheckoutSession(
        id=normalize_stripe_id(obj.get("id"), "cs_"),
        payment_intent_id=normalize_stripe_id(obj.get("payment_intent"), "pi_"),
        payment_status=str(obj.get("payment_status") or ""),
        amount_total=int_or_none(obj.get("amount_total")),
        currency=_str_or_none(obj.get("currency")),
        customer_id=normalize_stripe_id(obj.get("customer"), "cus_"),
        setup_intent_id=intent if bare else None,
        setup_payment_method_id=normalize_stripe_id(get(intent, "payment_method"), "pm_"),
        setup_customer_id=normalize_stripe_id(get(intent, "customer"), "cus_"),
        invoice_id=normalize_stripe_id(
            get(invoice, "id") if isinstance(invoice := obj.get("invoice"), Mapping) else invoice,
            "in_",
        ),
    )


def parse_payment_intent(obj: Mapping[str, Any]) -> PaymentIntent:
    error = get(obj, "last_payment_error")
    return PaymentIntent(
        id=normalize_stripe_id(obj.get("id"), "pi_"),
        amount_received=int_or_none(obj.get("amount_received")),
        currency=_str_or_none(obj.get("currency")),
        status=_str_or_none(obj.get("status")),
        ledger_id=int_or_none(metadata_of(obj).get("aza_ledger_id")),
        error_code=get(error, "decline_code") or get(error, "code"),
    )


def parse_setup_intent(obj: Mapping[str, Any]) -> SetupIntent:
    return SetupIntent(
        id=normalize_stripe_id(obj.get("id"), "seti_"),
        customer_id=normalize_stripe_id(obj.get("customer"), "cus_"),
        payment_method_id=normalize_stripe_id(obj.get("payment_method"), "pm_"),
    )


def parse_charge(obj: Mapping[str, Any]) -> Charge:
    refunds = get(obj, "refunds")
    refund_ids = (normalize_stripe_id(r, "re_") for r in (get(refunds, "data") or []))
    return Charge(
        id=normalize_stripe_id(obj.get("id"), "ch_") or normalize_stripe_id(obj.get("id"), "py_"),
        payment_intent_id=normalize_stripe_id(obj.get("payment_intent"), "pi_"),
        amount_refunded=int_or_none(obj.get("amount_refunded")),
        refund_ids=tuple(rid for rid in refund_ids if rid is not None),
    )


def parse_subscription(obj: Mapping[str, Any]) -> Subscription:
    """A subscription; plan and period on the first item in newer API versions."""
    items = get(get(obj, "items"), "data") or []
    first = items[0] if items else None
    lookup_key = get(get(first, "price"), "lookup_key")
    start = int_or_none(obj.get("current_period_start")) or int_or_none(
        get(first, "current_period_start")
    )
    end = int_or_none(obj.get("current_period_end")) or int_or_none(
        get(first, "current_period_end")
    )
    return Subscription(
        id=normalize_stripe_id(obj.get("id"), "sub_"),
        customer_id=normalize_stripe_id(obj.get("customer"), "cus_"),
        status=str(obj.get("status") or ""),
        lookup_key=str(lookup_key) if lookup_key else None,
        period_start=start,
        period_end=end,
    )


# The parser of each object type the gateway handles, by event type prefix.
_PARSERS = (
    ("checkout.session.", parse_checkout_session),
    ("payment_intent.", parse_payment_intent),
    ("setup_intent.", parse_setup_intent),
    ("charge.", parse_charge),
    ("customer.subscription.", parse_subscription),
)


def parse_event(
    event_id: str, event_type: str, created: Any, obj: Mapping[str, Any]
) -> StripeEvent:
    """The typed event of a verified payload's id, type, `created` and data object."""
    parsed: StripeObject = None
    for prefix, parse in _PARSERS:
        if event_type.startswith(prefix):
            parsed = parse(obj)
            break
    return StripeEvent(
        id=event_id,
        type=event_type,
        created=int_or_none(created),
        metadata=metadata_of(obj),
        object=parsed,
    )
