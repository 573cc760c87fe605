"""A real gateway process sends its Stripe calls to AZA_STRIPE_API_BASE (a local Stripe fake).

This is how operators try top-ups without Stripe: the environment variable
reaches stripe-python's client, and the whole checkout and auto-top-up path
runs against a Stripe fake on loopback.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs

import httpx
import openai
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from budget.operations import Operation
from budget.usage import Usage
from gateway.demo.fake_upstream import FAKE_UPSTREAM_KEY, FakeUpstream
from gateway.keys import KeyRole
from gateway.settings import Settings
from gateway.storage import open_database
from gateway.storage.metering import MeteringStore
from tests.credit.helpers import WEBHOOK_SECRET, event, sign
from tests.integration.conftest import serve
from tests.processes import gateway_processes

USD = 1_000_000


class StripeFake:
    """The two Stripe endpoints a top-up needs, recording what it was sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], dict[str, str]]] = []
        self.app = Starlette(
            routes=[
                Route("/v1/checkout/sessions", self.checkout, methods=["POST"]),
                Route("/v1/payment_intents", self.payment_intent, methods=["POST"]),
                Route("/v1/tax_rates", self.tax_rate, methods=["POST"]),
            ]
        )

    async def _record(self, request: Request) -> dict[str, str]:
        form = {k: v[-1] for k, v in parse_qs((await request.body()).decode()).items()}
        self.requests.append((request.url.path, form, dict(request.headers)))
        return form

    async def checkout(self, request: Request) -> JSONResponse:
        form = await self._record(request)
        return JSONResponse(
            {
                "id": "cs_fake_1",
                "object": "checkout.session",
                "mode": form.get("mode"),
                "url": "http://stripe.fake/checkout/cs_fake_1",
            }
        )

    async def tax_rate(self, request: Request) -> JSONResponse:
        """The VAT rate of config/defaults.toml ([credit] vat_rate), made once per process."""
        form = await self._record(request)
        return JSONResponse(
            {
                "id": "txr_fake_1",
                "object": "tax_rate",
                "active": True,
                "display_name": form.get("display_name"),
                "percentage": float(form["percentage"]),
                "inclusive": form.get("inclusive") == "true",
                "country": form.get("country"),
            }
        )

    async def payment_intent(self, request: Request) -> JSONResponse:
        form = await self._record(request)
        metadata = {
            k[len("metadata[") : -1]: v for k, v in form.items() if k.startswith("metadata[")
        }
        return JSONResponse(
            {
                "id": "pi_fake_1",
                "object": "payment_intent",
                "status": "succeeded",
                "amount": int(form["amount"]),
                "amount_received": int(form["amount"]),
                "currency": form["currency"],
                "customer": form.get("customer"),
                "metadata": metadata,
            }
        )


async def test_gateway_process_uses_the_stripe_base_from_its_environment(tmp_path: Any) -> None:
    """Checkout and an auto top-up from `aza-gateway serve` reach the local Stripe fake."""
    url = f"sqlite:///{tmp_path / 'gw.sqlite'}"
    db = await open_database(url)
    store = MeteringStore(db, plans=Settings().plans)
    now = int(time.time())
    await store.upsert_license(
        subscription_id="lic_stripe_e2e",
        practice_id="prac_e2e",
        lookup_key="aza_basic_monthly",
        period_start=now - 60,
        period_end=now + 86_400,
        customer_email="e2e@example.test",
    )
    key = await store.create_key("prac_e2e", role=KeyRole.ADMIN)
    stripe = StripeFake()
    try:
        async with serve(FakeUpstream()) as upstream, serve(stripe.app) as stripe_base:
            env = {
                "AZA_DATABASE_URL": url,
                "AZA_UPSTREAM_BASE_URL": upstream + "/v1",
                "OPENAI_API_KEY": FAKE_UPSTREAM_KEY,
                "STRIPE_SECRET_KEY": "sk_test_e2e_fake",
                "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
                "AZA_STRIPE_API_BASE": stripe_base,
                "AZA_AI_TOPUP_DRY_RUN": "0",
                "AZA_AI_AUTO_TOPUP_ENABLED": "1",
            }
            with gateway_processes(1, env) as (gateway,):
                headers = {"Authorization": f"Bearer {key}"}
                async with httpx.AsyncClient(base_url=gateway.url, timeout=20) as http:
                    checkout = await http.post(
                        "/v1/ai-credit/topup/checkout", headers=headers, json={"amount_chf": 30}
                    )
                    assert checkout.status_code == 200, checkout.text
                    assert (
                        checkout.json()["checkout_url"] == "http://stripe.fake/checkout/cs_fake_1"
                    )
                    setup = event(
                        "setup_intent.succeeded",
                        {
                            "id": "seti_e2e",
                            "object": "setup_intent",
                            "customer": "cus_e2e",
                            "payment_method": "pm_e2e",
                            "metadata": {
                                "aza_purpose": "ai_topup_setup",
                                "practice_id": "prac_e2e",
                            },
                        },
                    )
                    saved = await http.post(
                        "/v1/stripe/webhook",
                        content=setup,
                        headers={"Stripe-Signature": sign(setup)},
                    )
                    assert saved.status_code == 200, saved.text
                state = await store.state("prac_e2e")
                assert state.license is not None and state.period is not None
                await store.record_usage(
                    state.license,
                    state.period,
                    Usage(operation=Operation.CHAT, model="gpt-4o"),
                    cost_micros=20 * USD,
                    request_id="spent",
                )
                client = openai.AsyncOpenAI(
                    base_url=gateway.url + "/v1", api_key=key, max_retries=0
                )
                reply = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "Hallo"}]
                )
                await client.close()
                assert reply.choices
    finally:
        await db.close()
    paths = [path for path, _, _ in stripe.requests]
    assert paths == ["/v1/tax_rates", "/v1/checkout/sessions", "/v1/payment_intents"]
    _, rate_form, _ = stripe.requests[0]
    assert (rate_form["percentage"], rate_form["inclusive"]) == ("8.1", "true")
    _, checkout_form, checkout_headers = stripe.requests[1]
    assert checkout_form["metadata[aza_purpose]"] == "ai_topup"
    assert checkout_form["line_items[0][tax_rates][0]"] == "txr_fake_1"
    assert checkout_form["invoice_creation[enabled]"] == "true"
    assert checkout_headers["authorization"] == "Bearer sk_test_e2e_fake"
    _, charge_form, charge_headers = stripe.requests[2]
    assert charge_form["metadata[aza_purpose]"] == "ai_auto_topup"
    assert charge_form["payment_method"] == "pm_e2e" and charge_form["off_session"] == "true"
    assert "idempotency-key" in charge_headers
    assert charge_form["receipt_email"] == "e2e@example.test"
