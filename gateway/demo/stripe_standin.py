"""A small local stand-in for Stripe, so the console's payments can be clicked through offline.

It answers the API calls the gateway makes through stripe-python (pointed
here by `AZA_STRIPE_API_BASE`) with objects shaped as in Stripe's API
reference: Checkout Sessions, SetupIntents, PaymentIntents (automatic
top-ups), charges with their receipt URL, invoices and tax rates. A Checkout
Session's `url` leads to a local page whose "Pay" button sends the gateway a
`checkout.session.completed` event signed like Stripe signs webhooks
(`Stripe-Signature: t=…,v1=HMAC-SHA256(secret, "t.payload")`), then returns
the browser to the session's `success_url`. Nothing here moves money; state
lives in memory.
"""

from __future__ import annotations

import html
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.alerts.signing import signature


def stripe_signature(payload: bytes, secret: str, *, timestamp: int | None = None) -> str:
    """The `Stripe-Signature` header Stripe sends with `payload`: Stripe's scheme, which
    the gateway's own alert webhooks sign with too (`gateway.alerts.signing`)."""
    return signature(secret, int(time.time()) if timestamp is None else timestamp, payload)


def parse_form(body: bytes) -> dict[str, Any]:
    """Stripe's form encoding (`a[b][0][c]=v`) back into nested dicts and lists."""
    root: dict[str, Any] = {}
    for name, value in parse_qsl(body.decode(), keep_blank_values=True):
        head, _, rest = name.partition("[")
        keys = [head, *(part.rstrip("]") for part in rest.split("["))] if rest else [head]
        node = root
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    parsed: dict[str, Any] = _lists(root)
    return parsed


def _lists(value: Any) -> Any:
    """Dicts keyed 0, 1, 2, … (Stripe's array encoding) as lists, all the way down."""
    if not isinstance(value, dict):
        return value
    items = {key: _lists(inner) for key, inner in value.items()}
    if items and all(key.isdigit() for key in items):
        return [items[key] for key in sorted(items, key=int)]
    return items


def _id(prefix: str) -> str:
    return f"{prefix}_test_{secrets.token_hex(10)}"


@dataclass
class StripeStandIn:
    """The stand-in's state and its ASGI app (`.app`).

    `webhook_url`: where "Pay" sends the signed event (the gateway's
    `/v1/stripe/webhook`); `base_url`: this server's own address, for the
    URLs it hands out (set once it listens).
    """

    webhook_secret: str
    webhook_url: str = ""
    base_url: str = ""
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    setup_intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    payment_intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    tax_rates: dict[str, dict[str, Any]] = field(default_factory=dict)
    delivered: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.app = Starlette(
            routes=[
                Route("/v1/checkout/sessions", self.create_session, methods=["POST"]),
                Route("/v1/checkout/sessions/{id}", self.get_session, methods=["GET"]),
                Route("/v1/setup_intents/{id}", self.get_setup_intent, methods=["GET"]),
                Route("/v1/payment_intents", self.create_payment_intent, methods=["POST"]),
                Route("/v1/payment_intents/{id}", self.get_payment_intent, methods=["GET"]),
                Route("/v1/charges/{id}", self.get_charge, methods=["GET"]),
                Route("/v1/invoices/{id}", self.get_invoice, methods=["GET"]),
                Route("/v1/tax_rates", self.create_tax_rate, methods=["POST"]),
                Route("/checkout/{id}", self.checkout_page, methods=["GET"]),
                Route("/checkout/{id}/pay", self.pay, methods=["POST"]),
                Route("/receipts/{id}", self.receipt_page, methods=["GET"]),
            ]
        )

    # -- the API -----------------------------------------------------------------

    def _missing(self, kind: str, object_id: str) -> JSONResponse:
        return JSONResponse(
            {
                "error": {
                    "type": "invalid_request_error",
                    "code": "resource_missing",
                    "message": f"No such {kind}: '{object_id}'",
                    "param": "id",
                }
            },
            status_code=404,
        )

    async def create_session(self, request: Request) -> JSONResponse:
        form = parse_form(await request.body())
        session_id = _id("cs")
        items = form.get("line_items") or []
        amount = None
        currency = form.get("currency")
        if items:
            price = items[0].get("price_data", {})
            amount = int(price.get("unit_amount", 0)) * int(items[0].get("quantity", 1))
            currency = price.get("currency", currency)
        session = {
            "id": session_id,
            "object": "checkout.session",
            "mode": form.get("mode"),
            "status": "open",
            "payment_status": "unpaid" if form.get("mode") == "payment" else "no_payment_required",
            "amount_total": amount,
            "amount_subtotal": amount,
            "currency": currency,
            "client_reference_id": form.get("client_reference_id"),
            "customer": form.get("customer"),
            "customer_email": form.get("customer_email"),
            "metadata": form.get("metadata") or {},
            "success_url": form.get("success_url"),
            "cancel_url": form.get("cancel_url"),
            "url": f"{self.base_url}/checkout/{session_id}",
            "payment_intent": None,
            "setup_intent": None,
            "invoice": None,
            "livemode": False,
            "created": int(time.time()),
            "expires_at": int(time.time()) + 86_400,
            "_payment_intent_data": form.get("payment_intent_data") or {},
            "_setup_intent_data": form.get("setup_intent_data") or {},
            "_invoice_creation": form.get("invoice_creation") or {},
            "_line_items": items,
        }
        self.sessions[session_id] = session
        return JSONResponse(_public(session))

    async def get_session(self, request: Request) -> JSONResponse:
        session = self.sessions.get(request.path_params["id"])
        if session is None:
            return self._missing("checkout.session", request.path_params["id"])
        return JSONResponse(_public(session))

    async def get_setup_intent(self, request: Request) -> JSONResponse:
        intent = self.setup_intents.get(request.path_params["id"])
        if intent is None:
            return self._missing("setup_intent", request.path_params["id"])
        return JSONResponse(intent)

    def _charge(self, intent: dict[str, Any], email: str | None) -> dict[str, Any]:
        charge_id = _id("ch")
        charge = {
            "id": charge_id,
            "object": "charge",
            "amount": intent["amount"],
            "amount_captured": intent["amount"],
            "amount_refunded": 0,
            "currency": intent["currency"],
            "paid": True,
            "status": "succeeded",
            "payment_intent": intent["id"],
            "receipt_email": email,
            "receipt_url": f"{self.base_url}/receipts/{charge_id}",
            "metadata": intent.get("metadata") or {},
        }
        self.charges[charge_id] = charge
        return charge

    async def create_payment_intent(self, request: Request) -> JSONResponse:
        """An off-session automatic top-up: confirmed at once, as with a saved card."""
        form = parse_form(await request.body())
        intent_id = _id("pi")
        intent: dict[str, Any] = {
            "id": intent_id,
            "object": "payment_intent",
            "amount": int(form.get("amount", 0)),
            "amount_received": int(form.get("amount", 0)),
            "currency": form.get("currency"),
            "customer": form.get("customer"),
            "payment_method": form.get("payment_method"),
            "metadata": form.get("metadata") or {},
            "receipt_email": form.get("receipt_email"),
            "status": "succeeded",
            "livemode": False,
            "created": int(time.time()),
        }
        intent["latest_charge"] = self._charge(intent, form.get("receipt_email"))["id"]
        self.payment_intents[intent_id] = intent
        return JSONResponse(intent)

    async def get_payment_intent(self, request: Request) -> JSONResponse:
        intent = self.payment_intents.get(request.path_params["id"])
        if intent is None:
            return self._missing("payment_intent", request.path_params["id"])
        return JSONResponse(intent)

    async def get_charge(self, request: Request) -> JSONResponse:
        charge = self.charges.get(request.path_params["id"])
        if charge is None:
            return self._missing("charge", request.path_params["id"])
        return JSONResponse(charge)

    async def get_invoice(self, request: Request) -> JSONResponse:
        invoice = self.invoices.get(request.path_params["id"])
        if invoice is None:
            return self._missing("invoice", request.path_params["id"])
        return JSONResponse(invoice)

    async def create_tax_rate(self, request: Request) -> JSONResponse:
        form = parse_form(await request.body())
        rate_id = _id("txr")
        rate = {
            "id": rate_id,
            "object": "tax_rate",
            "active": True,
            "display_name": form.get("display_name"),
            "percentage": float(form.get("percentage", 0)),
            "inclusive": form.get("inclusive") == "true",
            "country": form.get("country"),
            "jurisdiction": form.get("jurisdiction"),
            "tax_type": form.get("tax_type"),
            "livemode": False,
        }
        self.tax_rates[rate_id] = rate
        return JSONResponse(rate)

    # -- the pages a person sees --------------------------------------------------

    async def checkout_page(self, request: Request) -> Response:
        session = self.sessions.get(request.path_params["id"])
        if session is None:
            return HTMLResponse("<h1>Unknown checkout session</h1>", status_code=404)
        if session["mode"] == "payment":
            amount = session["amount_total"] or 0
            what = f"{(session['currency'] or '').upper()} {amount / 100:.2f}"
        else:
            what = "Save a card for later payments"
        esc = html.escape
        page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Stripe stand-in checkout</title>
<style>body{{font-family:system-ui,sans-serif;max-width:30rem;margin:3rem auto;color:#263238}}
.box{{border:1px solid #cfd8dc;border-radius:8px;padding:1.5rem}}
button{{background:#635bff;color:#fff;border:0;border-radius:6px;padding:.6rem 1.4rem}}
</style>
</head><body><div class="box">
<p>Local Stripe stand-in (demo, no money moves)</p>
<h1 id="amount">{esc(what)}</h1>
<p>{esc(session.get("customer_email") or "")}</p>
<form method="post" action="{esc(session["id"])}/pay">
<button type="submit" id="pay">Pay</button></form>
<p><a href="{esc(session.get("cancel_url") or "/")}" id="cancel">Cancel</a></p>
</div></body></html>"""
        return HTMLResponse(page)

    async def pay(self, request: Request) -> Response:
        """Complete the session, send the signed webhook, return to the success URL."""
        session = self.sessions.get(request.path_params["id"])
        if session is None:
            return HTMLResponse("<h1>Unknown checkout session</h1>", status_code=404)
        if session["status"] != "complete":
            self._complete(session)
            event = {
                "id": _id("evt"),
                "object": "event",
                "api_version": "2025-03-31.basil",
                "created": int(time.time()),
                "livemode": False,
                "type": "checkout.session.completed",
                "data": {"object": _public(session)},
            }
            payload = json.dumps(event).encode()
            async with httpx.AsyncClient(timeout=30) as client:
                answer = await client.post(
                    self.webhook_url,
                    content=payload,
                    headers={
                        "content-type": "application/json",
                        "stripe-signature": stripe_signature(payload, self.webhook_secret),
                    },
                )
            self.delivered.append({"event": event, "status": answer.status_code})
        target = str(session.get("success_url") or "/").replace(
            "{CHECKOUT_SESSION_ID}", session["id"]
        )
        return RedirectResponse(target, status_code=303)

    def _complete(self, session: dict[str, Any]) -> None:
        session["status"] = "complete"
        email = session.get("customer_email")
        customer = session.get("customer") or _id("cus")
        session["customer"] = customer
        if session["mode"] == "setup":
            intent_id = _id("seti")
            self.setup_intents[intent_id] = {
                "id": intent_id,
                "object": "setup_intent",
                "status": "succeeded",
                "customer": customer,
                "payment_method": _id("pm"),
                "usage": "off_session",
                "metadata": session["_setup_intent_data"].get("metadata") or session["metadata"],
            }
            session["setup_intent"] = intent_id
            return
        session["payment_status"] = "paid"
        intent_id = _id("pi")
        intent = {
            "id": intent_id,
            "object": "payment_intent",
            "amount": session["amount_total"],
            "amount_received": session["amount_total"],
            "currency": session["currency"],
            "customer": customer,
            "status": "succeeded",
            "metadata": session["_payment_intent_data"].get("metadata") or session["metadata"],
        }
        charge = self._charge(intent, email)
        intent["latest_charge"] = charge["id"]
        self.payment_intents[intent_id] = intent
        session["payment_intent"] = intent_id
        if str(session["_invoice_creation"].get("enabled")) == "true":
            invoice_id = _id("in")
            self.invoices[invoice_id] = {
                "id": invoice_id,
                "object": "invoice",
                "status": "paid",
                "amount_paid": session["amount_total"],
                "currency": session["currency"],
                "customer": customer,
                "customer_email": email,
                "payment_intent": intent_id,
                "hosted_invoice_url": f"{self.base_url}/receipts/{invoice_id}",
                "invoice_pdf": f"{self.base_url}/receipts/{invoice_id}?pdf=1",
                "footer": session["_invoice_creation"].get("invoice_data", {}).get("footer"),
                "metadata": session["metadata"],
            }
            session["invoice"] = invoice_id

    async def receipt_page(self, request: Request) -> Response:
        object_id = request.path_params["id"]
        found: Mapping[str, Any] | None = self.invoices.get(object_id) or self.charges.get(
            object_id
        )
        if found is None:
            return HTMLResponse("<h1>Unknown receipt</h1>", status_code=404)
        amount = found.get("amount_paid", found.get("amount", 0)) or 0
        esc = html.escape
        return HTMLResponse(
            f"<!doctype html><html><head><meta charset='utf-8'><title>Receipt</title></head>"
            f"<body><h1>Receipt {esc(object_id)}</h1>"
            f"<p>{esc(str(found.get('currency', '')).upper())} {amount / 100:.2f}</p>"
            f"<p>{esc(str(found.get('footer') or ''))}</p></body></html>"
        )


def _public(session: Mapping[str, Any]) -> dict[str, Any]:
    """A session as Stripe shows it (without the stand-in's own bookkeeping)."""
    return {k: v for k, v in session.items() if not k.startswith("_")}
