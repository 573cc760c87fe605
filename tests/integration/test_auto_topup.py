"""After a settle leaves a practice below its trigger, the gateway tops up in the background."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import respx

from budget.operations import Operation
from budget.usage import Usage
from gateway.settings import Secret
from gateway.storage import AnyDatabase
from tests.credit.helpers import STRIPE_BASE, STRIPE_HTTPX_DEPRECATION, WEBHOOK_SECRET, form, save
from tests.integration.conftest import StartGateway

# stripe-python's httpx client posts `data=<str>`, which httpx deprecates
# (the request is still correct); only that warning is ignored here.
pytestmark = pytest.mark.filterwarnings(STRIPE_HTTPX_DEPRECATION)

USD = 1_000_000
CHAT: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hallo"}]}


def payment_intent(request: httpx.Request) -> httpx.Response:
    sent = form(request)
    return httpx.Response(
        200,
        json={
            "id": "pi_background",
            "object": "payment_intent",
            "status": "succeeded",
            "amount": int(sent.get("amount", "3000")),
            "amount_received": int(sent.get("amount", "3000")),
            "currency": "chf",
            "metadata": {
                k.removeprefix("metadata[").removesuffix("]"): v
                for k, v in sent.items()
                if k.startswith("metadata[")
            },
        },
    )


async def auto_topups(db: AnyDatabase, practice: str) -> list[tuple[str, int]]:
    async with db.read() as conn:
        rows = await conn.fetchall(
            "SELECT status, amount_internal_micro_usd FROM ai_credit_ledger "
            "WHERE practice_id = ? AND event_type = 'auto_topup_purchase' ORDER BY id",
            practice,
        )
    return [(row[0], int(row[1])) for row in rows]


async def test_settle_below_the_trigger_tops_up_once_in_the_background(
    start_gateway: StartGateway, db: AnyDatabase
) -> None:
    """92.5 % used, trigger 10 %: a request's settle starts one auto top-up; the next does not."""
    with respx.mock(assert_all_called=False) as stripe:
        stripe.route(host="127.0.0.1").pass_through()  # gateway and fake upstream stay real
        charge = stripe.post(f"{STRIPE_BASE}/v1/payment_intents").mock(side_effect=payment_intent)
        async with start_gateway(
            stripe_secret_key=Secret("sk_test_background"),
            stripe_api_base=STRIPE_BASE,
            stripe_webhook_secret=Secret(WEBHOOK_SECRET),
            topup_dry_run=False,
            auto_topup_enabled=True,
        ) as gateway:
            await save(db, trigger=10, practice=gateway.practice)
            state = await gateway.metering.state(gateway.practice)
            assert state.license is not None and state.period is not None
            await gateway.metering.record_usage(
                state.license,
                state.period,
                Usage(Operation.CHAT, "gpt-4o-mini"),
                cost_micros=20 * USD - 1_500_000,
                request_id="earlier",
            )
            client = gateway.client()
            await client.chat.completions.create(**CHAT)  # admitted: 1.50 USD left

            for _ in range(250):
                if await auto_topups(db, gateway.practice) == [("succeeded", 10 * USD)]:
                    break
                await asyncio.sleep(0.02)
            assert await auto_topups(db, gateway.practice) == [("succeeded", 10 * USD)]
            assert charge.call_count == 1
            assert form(charge.calls.last.request)["metadata[aza_purpose]"] == "ai_auto_topup"

            await client.chat.completions.create(**CHAT)
            await gateway.settled(3)
            await asyncio.sleep(0.2)
            assert charge.call_count == 1
            assert len(await auto_topups(db, gateway.practice)) == 1
