"""The Stripe calls credit needs, behind one small interface.

`StripePort` is what the services use; `StripeClientAdapter` implements it
with stripe-python's `StripeClient` on its httpx transport (async). Stripe's
exceptions are translated here, where they enter, into ours:

- `CardDeclined` / `AuthenticationRequired`: the bank said no (a 402 card error);
- `StripeUnavailable`: timeout, connection error, 5xx, rate limit, lock conflict —
  the outcome is unknown or the call may be retried later;
- `StripeRequestFailed`: any other refusal (bad request, missing object, auth).

Results are our own frozen dataclasses, never Stripe objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

import stripe

from credit.stripe_ids import normalize_stripe_id


class StripeFailure(Exception):
    """A Stripe call failed (base of the errors below)."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        http_status: int | None = None,
        payment_intent_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status
        self.payment_intent_id = payment_intent_id
        # Stripe's request id (`req_…`): what Stripe support needs, and safe to show.
        self.request_id = request_id


class CardDeclined(StripeFailure):
    """The card was declined (Stripe card_error); `code` is Stripe's, e.g. card_declined."""


class AuthenticationRequired(CardDeclined):
    """The bank wants the cardholder present (3-D Secure): an off-session charge cannot pass."""


class StripeUnavailable(StripeFailure):
    """Stripe could not be reached or answered 5xx/429/409: outcome unknown, retry later."""


class StripeRequestFailed(StripeFailure):
    """Stripe refused the request for another reason (4xx other than a card error)."""


@dataclass(frozen=True, slots=True)
class PaymentIntentResult:
    """The parts of a PaymentIntent credit looks at (amounts in Rappen)."""

    id: str
    status: str
    amount_rappen: int
    amount_received_rappen: int
    currency: str
    customer_id: str | None
    metadata: Mapping[str, str]
    last_error_code: str | None = None
    # The charge of a paid intent (its receipt_url is the receipt Stripe e-mails).
    latest_charge_id: str | None = None


@dataclass(frozen=True, slots=True)
class SetupIntentResult:
    id: str
    status: str
    customer_id: str | None
    payment_method_id: str | None = field(repr=False)
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class CheckoutSessionResult:
    id: str
    url: str | None


@dataclass(frozen=True, slots=True)
class CheckoutRequest:
    """A Checkout Session to create (mode "payment" with one CHF line, or "setup")."""

    mode: str
    success_url: str
    cancel_url: str
    metadata: Mapping[str, str]
    currency: str = "chf"
    amount_rappen: int | None = None
    product_name: str | None = None
    customer_id: str | None = None
    customer_email: str | None = None
    client_reference_id: str | None = None
    # VAT: a Stripe tax rate (inclusive) on the line, or Stripe Tax computing it.
    tax_rate_id: str | None = None
    automatic_tax: bool = False
    invoice_footer: str | None = None


@dataclass(frozen=True, slots=True)
class PaymentIntentRequest:
    """An off-session, confirmed PaymentIntent charging a saved card."""

    amount_rappen: int
    currency: str
    customer_id: str
    payment_method_id: str = field(repr=False)
    metadata: Mapping[str, str]
    description: str
    # Stripe e-mails its receipt of the charge here (the license's e-mail).
    receipt_email: str | None = None


class StripePort(Protocol):
    async def create_checkout_session(self, request: CheckoutRequest) -> CheckoutSessionResult: ...

    async def create_payment_intent(
        self, request: PaymentIntentRequest, *, idempotency_key: str
    ) -> PaymentIntentResult: ...

    async def retrieve_payment_intent(self, payment_intent_id: str) -> PaymentIntentResult: ...

    async def retrieve_setup_intent(self, setup_intent_id: str) -> SetupIntentResult: ...

    async def vat_tax_rate(self, percentage: Decimal) -> str:
        """The id of an inclusive Swiss VAT tax rate of `percentage` (made once, then kept)."""
        ...

    async def receipt_url(
        self,
        *,
        invoice_id: str | None = None,
        payment_intent_id: str | None = None,
        charge_id: str | None = None,
    ) -> str | None:
        """The invoice's hosted URL, else the receipt URL of the charge (given, or the
        payment intent's latest)."""
        ...


def signature_matches(payload: str, header: str, secret: str, *, tolerance_seconds: int) -> bool:
    """Whether a webhook's `Stripe-Signature` header signs `payload` with `secret`.

    Stripe's scheme (HMAC-SHA256 over the timestamp and the raw body), with
    the timestamp at most `tolerance_seconds` old; a malformed header does not match.
    """
    try:
        stripe.WebhookSignature.verify_header(payload, header, secret, tolerance=tolerance_seconds)
    except stripe.SignatureVerificationError:
        return False
    return True


def checkout_params(request: CheckoutRequest) -> dict[str, Any]:
    """Stripe's Checkout Session parameters for `request`."""
    metadata = dict(request.metadata)
    params: dict[str, Any] = {
        "mode": request.mode,
        "success_url": request.success_url,
        "cancel_url": request.cancel_url,
        "metadata": metadata,
    }
    if request.client_reference_id:
        params["client_reference_id"] = request.client_reference_id
    if request.customer_id:
        params["customer"] = request.customer_id
    elif request.customer_email:
        params["customer_email"] = request.customer_email
    if request.mode == "payment":
        if request.amount_rappen is None:
            raise ValueError("a payment checkout needs amount_rappen")
        params["line_items"] = [
            {
                "quantity": 1,
                "price_data": {
                    "currency": request.currency,
                    "unit_amount": request.amount_rappen,
                    "product_data": {"name": request.product_name or "AzA KI-Zusatzguthaben"},
                },
            }
        ]
        # The PaymentIntent carries the same metadata, so its own webhook can
        # be matched (and deduplicated) against the session's.
        params["payment_intent_data"] = {"metadata": metadata}
        # A paid top-up gets an invoice (Stripe hosts it, and e-mails it with
        # the receipt) that a practice can book; the ledger keeps its URL.
        invoice_data: dict[str, Any] = {"metadata": metadata}
        if request.invoice_footer:
            invoice_data["footer"] = request.invoice_footer
        params["invoice_creation"] = {"enabled": True, "invoice_data": invoice_data}
        if request.automatic_tax:
            params["automatic_tax"] = {"enabled": True}
            # The amount is what the practice pays, VAT included: Stripe Tax
            # must not add VAT on top (an exclusive default would), or the
            # paid total no longer matches the top-up and nothing is credited.
            params["line_items"][0]["price_data"]["tax_behavior"] = "inclusive"
        elif request.tax_rate_id:
            params["line_items"][0]["tax_rates"] = [request.tax_rate_id]
    else:
        params["currency"] = request.currency
        params["setup_intent_data"] = {"metadata": metadata}
        if not request.customer_id:
            params["customer_creation"] = "always"
    return params


def _str_map(value: Any) -> dict[str, str]:
    if not value:
        return {}
    return {str(k): str(v) for k, v in dict(value).items() if v is not None}


def payment_intent_result(obj: Mapping[str, Any]) -> PaymentIntentResult:
    """Our view of a PaymentIntent (a Stripe object or webhook dict)."""
    last_error = obj.get("last_payment_error") or {}
    return PaymentIntentResult(
        id=str(obj.get("id")),
        status=str(obj.get("status") or ""),
        amount_rappen=int(obj.get("amount") or 0),
        amount_received_rappen=int(obj.get("amount_received") or 0),
        currency=str(obj.get("currency") or ""),
        customer_id=normalize_stripe_id(obj.get("customer"), "cus_"),
        metadata=_str_map(obj.get("metadata")),
        last_error_code=(last_error.get("decline_code") or last_error.get("code"))
        if isinstance(last_error, Mapping)
        else None,
        latest_charge_id=normalize_stripe_id(
            charge.get("id") if isinstance(charge := obj.get("latest_charge"), Mapping) else charge,
            "ch_",
        ),
    )


def _safe_token(value: Any, prefix: str = "") -> str | None:
    """`value` when it is a short identifier-like string (a Stripe code or request id)."""
    if not isinstance(value, str) or not value.startswith(prefix):
        return None
    if not 0 < len(value) <= 64 or not all(
        c.isascii() and (c.isalnum() or c in "_-") for c in value
    ):
        return None
    return value


def _translate(exc: stripe.StripeError) -> StripeFailure:
    """Our error for a Stripe one, carrying none of Stripe's text.

    Stripe's messages can quote what it was sent (an invalid key's prefix,
    parameter values), so they never leave this module: the message says
    only the kind of failure, the HTTP status, Stripe's error code and its
    request id.
    """
    status = exc.http_status
    code = _safe_token(exc.code)
    request_id = _safe_token(exc.request_id, "req_")
    message = (
        f"Stripe {type(exc).__name__} (HTTP {status if status is not None else '-'}, "
        f"code {code or '-'}, request {request_id or '-'})"
    )
    body = exc.json_body if isinstance(exc.json_body, dict) else {}
    err = body.get("error") if isinstance(body.get("error"), dict) else {}
    pi_id = normalize_stripe_id(err.get("payment_intent"), "pi_") if err else None
    if isinstance(exc, stripe.CardError):
        decline = _safe_token(err.get("decline_code")) if err else None
        kind: type[CardDeclined] = (
            AuthenticationRequired if "authentication_required" in (code, decline) else CardDeclined
        )
        return kind(
            message,
            code=decline or code,
            http_status=status,
            payment_intent_id=pi_id,
            request_id=request_id,
        )
    if isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError) or (
        status is not None and (status >= 500 or status in (409, 429))
    ):
        return StripeUnavailable(
            message, code=code, http_status=status, payment_intent_id=pi_id, request_id=request_id
        )
    return StripeRequestFailed(
        message, code=code, http_status=status, payment_intent_id=pi_id, request_id=request_id
    )


class StripeClientAdapter:
    """`StripePort` on stripe-python's `StripeClient` (async, httpx transport)."""

    def __init__(
        self,
        api_key: str,
        *,
        api_base: str | None = None,
        timeout_seconds: float = 30.0,
        max_network_retries: int = 2,
    ) -> None:
        # The key lives only inside the client; this object's repr shows none of it.
        self._http = stripe.HTTPXClient(timeout=timeout_seconds)
        self._tax_rates: dict[Decimal, str] = {}
        self._client = stripe.StripeClient(
            api_key,
            http_client=self._http,
            base_addresses={"api": api_base.rstrip("/")} if api_base else None,
            max_network_retries=max_network_retries,
        )

    def __repr__(self) -> str:
        return "StripeClientAdapter()"

    async def aclose(self) -> None:
        """Close the HTTP connections (at the gateway's shutdown)."""
        await self._http.close_async()  # type: ignore[no-untyped-call]  # untyped in stripe

    async def create_checkout_session(self, request: CheckoutRequest) -> CheckoutSessionResult:
        params: Any = checkout_params(request)
        try:
            session = await self._client.v1.checkout.sessions.create_async(params)
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        return CheckoutSessionResult(id=str(session.id), url=session.url)

    async def create_payment_intent(
        self, request: PaymentIntentRequest, *, idempotency_key: str
    ) -> PaymentIntentResult:
        params: Any = {
            "amount": request.amount_rappen,
            "currency": request.currency,
            "customer": request.customer_id,
            "payment_method": request.payment_method_id,
            "confirm": True,
            "off_session": True,
            "description": request.description,
            "metadata": dict(request.metadata),
        }
        if request.receipt_email:
            params["receipt_email"] = request.receipt_email
        try:
            intent = await self._client.v1.payment_intents.create_async(
                params, {"idempotency_key": idempotency_key}
            )
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        return payment_intent_result(intent.to_dict())

    async def retrieve_payment_intent(self, payment_intent_id: str) -> PaymentIntentResult:
        try:
            intent = await self._client.v1.payment_intents.retrieve_async(payment_intent_id)
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        return payment_intent_result(intent.to_dict())

    async def retrieve_setup_intent(self, setup_intent_id: str) -> SetupIntentResult:
        try:
            found = await self._client.v1.setup_intents.retrieve_async(setup_intent_id)
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        intent = found.to_dict()
        return SetupIntentResult(
            id=str(intent.get("id")),
            status=str(intent.get("status") or ""),
            customer_id=normalize_stripe_id(intent.get("customer"), "cus_"),
            payment_method_id=normalize_stripe_id(intent.get("payment_method"), "pm_"),
            metadata=_str_map(intent.get("metadata")),
        )

    async def vat_tax_rate(self, percentage: Decimal) -> str:
        known = self._tax_rates.get(percentage)
        if known is not None:
            return known
        params: Any = {
            "display_name": "MWST",
            "description": f"Mehrwertsteuer {percentage} %",
            "percentage": str(percentage),
            "inclusive": True,
            "country": "CH",
            "jurisdiction": "CH",
            "tax_type": "vat",
        }
        try:
            rate = await self._client.v1.tax_rates.create_async(
                params, {"idempotency_key": f"aza-vat-ch-{percentage}"}
            )
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        self._tax_rates[percentage] = str(rate.id)
        return str(rate.id)

    async def receipt_url(
        self,
        *,
        invoice_id: str | None = None,
        payment_intent_id: str | None = None,
        charge_id: str | None = None,
    ) -> str | None:
        try:
            if invoice_id:
                invoice = (await self._client.v1.invoices.retrieve_async(invoice_id)).to_dict()
                url = invoice.get("hosted_invoice_url")
                if isinstance(url, str) and url:
                    return url
            if charge_id is None and payment_intent_id:
                intent = await self._client.v1.payment_intents.retrieve_async(payment_intent_id)
                charge_id = payment_intent_result(intent.to_dict()).latest_charge_id
            if charge_id:
                charge = (await self._client.v1.charges.retrieve_async(charge_id)).to_dict()
                url = charge.get("receipt_url")
                if isinstance(url, str) and url:
                    return url
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        return None
