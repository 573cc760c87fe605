"""Practice, admin and Stripe webhook routes through the running gateway.

Stripe is faked at the HTTP level: respx intercepts stripe-python's httpx
client (the gateway's own loopback traffic passes through untouched).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import respx

from gateway.keys import KeyRole
from gateway.settings import Secret
from gateway.storage import AnyDatabase
from gateway.storage.metering import MeteringStore
from tests.credit.helpers import STRIPE_BASE, WEBHOOK_SECRET, event, form, sign, topup_meta
from tests.integration.conftest import Gateway, StartGateway

SERVICE_TOKEN = "svc-token-for-tests"
USD = 1_000_000

CREDIT_SETTINGS: dict[str, Any] = {
    "api_token": Secret(SERVICE_TOKEN),
    "stripe_secret_key": Secret("sk_test_routes_fake"),
    "stripe_api_base": STRIPE_BASE,
    "stripe_webhook_secret": Secret(WEBHOOK_SECRET),
    "topup_dry_run": False,
    "auto_topup_enabled": True,
}


@pytest.fixture
def stripe() -> Any:
    with respx.mock(assert_all_called=False) as mock:
        # The gateway's own traffic (client → gateway → fake upstream) is real.
        mock.route(host="127.0.0.1").pass_through()
        yield mock


@pytest.fixture
async def gw(start_gateway: StartGateway, stripe: Any) -> AsyncIterator[Gateway]:
    async with start_gateway(**CREDIT_SETTINGS) as gateway:
        yield gateway


@pytest.fixture
async def http(gw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gw.root, timeout=10) as client:
        yield client


def key_headers(gw: Gateway, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.key}", **extra}


SERVICE = {"Authorization": f"Bearer {SERVICE_TOKEN}"}


async def ledger_rows(db: AnyDatabase, practice: str) -> list[dict[str, Any]]:
    async with db.read() as conn:
        rows = await conn.fetchall(
            "SELECT event_type, status, amount_internal_micro_usd, amount_paid_rappen, meta_json "
            "FROM ai_credit_ledger WHERE practice_id = ? ORDER BY id",
            practice,
        )
    return [
        dict(zip(("event_type", "status", "micros", "rappen", "meta"), r, strict=True))
        for r in (tuple(row[i] for i in range(5)) for row in rows)
    ]


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "code", "param"}
    return dict(body["error"])


async def test_history_no_token_401(http: httpx.AsyncClient) -> None:
    """Seed: history without a key answers 401, whatever practice header is sent."""
    response = await http.get(
        "/v1/ai-credit/history", headers={"X-Device-Id": "dev1", "X-Practice-Id": "prac_top"}
    )
    assert assert_openai_error(response, 401)["code"] == "invalid_api_key"


async def test_auto_topup_settings_get_no_token_401(http: httpx.AsyncClient) -> None:
    """Seed: auto-top-up settings without a key answer 401."""
    response = await http.get(
        "/v1/ai-credit/auto-topup/settings",
        headers={"X-Device-Id": "dev1", "X-Practice-Id": "prac_top"},
    )
    assert_openai_error(response, 401)


async def test_a_key_reaches_only_its_own_practice(
    http: httpx.AsyncClient, gw: Gateway, metering: MeteringStore
) -> None:
    """A practice header sent with a gateway key is ignored: own data only."""
    other_key = await metering.create_key("prac_other", role=KeyRole.ADMIN)
    await http.post(
        "/v1/admin/practices/prac_other/adjustments",
        headers=SERVICE,
        json={"amount_usd": "7.5", "note": "goodwill"},
    )
    mine = await http.get(
        "/v1/ai-credit/history", headers=key_headers(gw, **{"X-Practice-Id": "prac_other"})
    )
    theirs = await http.get(
        "/v1/ai-credit/history", headers={"Authorization": f"Bearer {other_key}"}
    )
    assert mine.status_code == 200 and theirs.status_code == 200
    assert mine.json()["items"] == []
    assert len(theirs.json()["items"]) == 1
    assert theirs.json()["items"][0]["amount_internal_usd"] == 7.5


async def test_service_token_acts_for_the_named_practice(
    http: httpx.AsyncClient, gw: Gateway
) -> None:
    """The service token reads the practice named in X-Practice-Id, and must name one."""
    named = await http.get(
        "/v1/ai-credit/budget", headers={**SERVICE, "X-Practice-Id": gw.practice}
    )
    assert named.status_code == 200 and named.json()["practice_id"] == gw.practice
    unnamed = await http.get("/v1/ai-credit/budget", headers=SERVICE)
    assert assert_openai_error(unnamed, 400)["param"] == "X-Practice-Id"


async def test_budget_route_shows_the_snapshot(http: httpx.AsyncClient, gw: Gateway) -> None:
    """GET budget: 20 USD plan, nothing used, extra credit after an adjustment, percent > 100."""
    await http.post(
        f"/v1/admin/practices/{gw.practice}/adjustments",
        headers=SERVICE,
        json={"amount_usd": 10, "note": "seed figure"},
    )
    body = (await http.get("/v1/ai-credit/budget", headers=key_headers(gw))).json()
    assert body["budget_usd"] == 20.0 and body["used_usd"] == 0.0
    assert body["extra_credit_remaining_usd"] == 10.0
    assert body["available_percent"] == 150
    assert body["license"]["plan"] == "aza_basic_monthly"


async def test_admin_routes_need_the_service_token(http: httpx.AsyncClient, gw: Gateway) -> None:
    """A practice key on an admin route gets 403; no credential gets 401."""
    path = f"/v1/admin/practices/{gw.practice}/ledger"
    assert_openai_error(await http.get(path, headers=key_headers(gw)), 403)
    assert_openai_error(await http.get(path), 401)


@pytest.mark.parametrize("amount", ["NaN", "0", "abc", "1e9", "Infinity", None, True])
async def test_bad_adjustment_amount_is_rejected_and_writes_nothing(
    http: httpx.AsyncClient, gw: Gateway, amount: Any
) -> None:
    """Invalid amounts answer 4xx in the OpenAI shape and leave the ledger empty."""
    response = await http.post(
        f"/v1/admin/practices/{gw.practice}/adjustments",
        headers=SERVICE,
        json={"amount_usd": amount, "note": "x"},
    )
    assert response.status_code in (400, 422), response.text
    assert "error" in response.json()
    assert await ledger_rows(gw.db, gw.practice) == []


async def test_admin_ledger_masks_stripe_references(http: httpx.AsyncClient, gw: Gateway) -> None:
    """The admin ledger shows entries with masked Stripe ids, never the whole id."""
    payload = event(
        "checkout.session.completed",
        {
            "id": "cs_test_admin_123456789",
            "object": "checkout.session",
            "mode": "payment",
            "payment_status": "paid",
            "amount_total": 3000,
            "currency": "chf",
            "payment_intent": "pi_admin_abcdef123456",
            "metadata": topup_meta(credit="10", paid="30"),
        },
    )
    hook = await http.post(
        "/v1/stripe/webhook", content=payload, headers={"Stripe-Signature": sign(payload)}
    )
    assert hook.status_code == 200, hook.text
    response = await http.get(f"/v1/admin/practices/{gw.practice}/ledger", headers=SERVICE)
    text = response.text
    assert response.status_code == 200
    entries = response.json()["entries"]
    assert len(entries) == 1 and "checkout_session_masked" in entries[0]
    assert "cs_test_admin_123456789" not in text and "pi_admin_abcdef123456" not in text


async def test_webhook_with_bad_or_missing_signature_writes_nothing(
    http: httpx.AsyncClient, gw: Gateway
) -> None:
    """Unsigned or wrongly signed events answer 400 and credit nothing."""
    payload = event(
        "payment_intent.succeeded",
        {
            "id": "pi_forged",
            "object": "payment_intent",
            "status": "succeeded",
            "amount": 3000,
            "amount_received": 3000,
            "currency": "chf",
            "metadata": topup_meta(),
        },
    )
    missing = await http.post("/v1/stripe/webhook", content=payload)
    forged = await http.post(
        "/v1/stripe/webhook",
        content=payload,
        headers={"Stripe-Signature": sign(payload, "whsec_wrong")},
    )
    tampered = await http.post(
        "/v1/stripe/webhook",
        content=payload.replace(b'"20"', b'"2000"'),
        headers={"Stripe-Signature": sign(payload)},
    )
    for response in (missing, forged, tampered):
        assert_openai_error(response, 400)
    assert await ledger_rows(gw.db, gw.practice) == []


async def test_webhook_replay_credits_once(http: httpx.AsyncClient, gw: Gateway) -> None:
    """The same signed event delivered three times credits once."""
    payload = event(
        "payment_intent.succeeded",
        {
            "id": "pi_replayed_1",
            "object": "payment_intent",
            "status": "succeeded",
            "amount": 3000,
            "amount_received": 3000,
            "currency": "chf",
            "metadata": topup_meta(credit="10"),
        },
        event_id="evt_replayed_1",
    )
    answers = [
        await http.post(
            "/v1/stripe/webhook", content=payload, headers={"Stripe-Signature": sign(payload)}
        )
        for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["duplicate"] for a in answers] == [False, True, True]
    rows = await ledger_rows(gw.db, gw.practice)
    assert [(r["event_type"], r["status"], r["micros"]) for r in rows] == [
        ("topup_purchase", "succeeded", 10 * USD)
    ]


async def test_a_late_subscription_update_does_not_revive_a_canceled_license(
    http: httpx.AsyncClient, gw: Gateway
) -> None:
    """deleted, then an older updated (active) delivered late: both 200, the key stays blocked."""
    now = int(time.time())
    subscription = {
        "id": "sub_top",  # the practice's license, written by the metering store (no event time)
        "object": "subscription",
        "customer": "cus_x",
        "status": "active",
        "metadata": {},
        "items": {"object": "list", "data": []},
    }

    async def deliver(event_type: str, created: int) -> dict[str, Any]:
        payload = event(event_type, subscription, created=created)
        answer = await http.post(
            "/v1/stripe/webhook", content=payload, headers={"Stripe-Signature": sign(payload)}
        )
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    deleted = await deliver("customer.subscription.deleted", now - 10)
    assert (deleted["handled"], deleted["result"]["reason"]) == (True, None)
    late = await deliver("customer.subscription.updated", now - 20)
    assert (late["handled"], late["duplicate"], late["result"]["reason"]) == (
        True,
        False,
        "stale_event",
    )
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await gw.client().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.response.json()["error_code"] == "LICENSE_INACTIVE"
    assert gw.fake.requests == 0


async def test_topup_checkout_creates_a_stripe_session(
    http: httpx.AsyncClient, gw: Gateway, stripe: Any
) -> None:
    """Manual top-up: Stripe gets a CHF payment session with our metadata; the URL comes back."""
    route = stripe.post(f"{STRIPE_BASE}/v1/checkout/sessions").mock(
        return_value=httpx.Response(
            200,
            json={
                "id": "cs_test_new",
                "object": "checkout.session",
                "url": "https://checkout.stripe.test/pay",
            },
        )
    )
    response = await http.post(
        "/v1/ai-credit/topup/checkout", headers=key_headers(gw), json={"amount_chf": 45}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["checkout_url"] == "https://checkout.stripe.test/pay"
    assert body["dry_run"] is False
    sent = form(route.calls.last.request)
    assert sent["mode"] == "payment"
    assert sent["metadata[aza_purpose]"] == "ai_topup"
    assert sent["metadata[practice_id]"] == gw.practice
    assert sent["metadata[paid_chf]"] in ("45", "45.00")
    assert sent["metadata[internal_credit_usd]"].startswith("15")
    assert sent["success_url"] == "https://aza-medwork.ch/succes2"


@pytest.mark.parametrize("amount", ["NaN", -30, 0, "abc", 10**9, "Infinity"])
async def test_topup_checkout_rejects_bad_amounts(
    http: httpx.AsyncClient, gw: Gateway, stripe: Any, amount: Any
) -> None:
    """Absurd top-up amounts answer 422 and never reach Stripe."""
    route = stripe.post(f"{STRIPE_BASE}/v1/checkout/sessions")
    response = await http.post(
        "/v1/ai-credit/topup/checkout", headers=key_headers(gw), json={"amount_chf": amount}
    )
    assert_openai_error(response, 422)
    assert not route.called


async def test_topup_checkout_dry_run_and_live_block(
    start_gateway: StartGateway, stripe: Any
) -> None:
    """Dry run answers without a URL; a live key without allow-live gets LIVE_TOPUP_BLOCKED."""
    route = stripe.post(f"{STRIPE_BASE}/v1/checkout/sessions")
    dry_settings = {**CREDIT_SETTINGS, "topup_dry_run": True}
    async with start_gateway(**dry_settings) as dry, httpx.AsyncClient(base_url=dry.root) as client:
        body = (
            await client.post(
                "/v1/ai-credit/topup/checkout",
                headers=key_headers(dry),
                json={"amount_chf": 30},
            )
        ).json()
    assert body["dry_run"] is True and body["checkout_url"] is None
    live = {**CREDIT_SETTINGS, "stripe_secret_key": Secret("sk_live_not_allowed")}
    async with (
        start_gateway(**live) as blocked,
        httpx.AsyncClient(base_url=blocked.root) as client,
    ):
        response = await client.post(
            "/v1/ai-credit/topup/checkout",
            headers=key_headers(blocked),
            json={"amount_chf": 30},
        )
    assert response.json()["error"]["error_code"] == "LIVE_TOPUP_BLOCKED"
    assert not route.called


async def test_settings_routes_hide_the_card_and_refuse_enable_without_one(
    http: httpx.AsyncClient, gw: Gateway
) -> None:
    """Enable without a card → AUTO_TOPUP_NO_PAYMENT_METHOD; status never shows a pm id."""
    enable = await http.put(
        "/v1/ai-credit/auto-topup/settings", headers=key_headers(gw), json={"enabled": True}
    )
    assert enable.status_code >= 400
    assert enable.json()["error"]["error_code"] == "AUTO_TOPUP_NO_PAYMENT_METHOD"
    status = await http.get("/v1/ai-credit/auto-topup/settings", headers=key_headers(gw))
    assert status.status_code == 200
    assert status.json()["payment_method_configured"] is False
    assert status.json()["trigger_below_percent"] == 5
    assert "default_payment_method_id" not in status.text


async def test_card_setup_then_blocked_request_is_rescued_by_auto_topup(
    http: httpx.AsyncClient, gw: Gateway, stripe: Any
) -> None:
    """Setup webhook saves the card; an exhausted budget then auto-tops-up and the call passes."""
    setup = event(
        "checkout.session.completed",
        {
            "id": "cs_setup_e2e",
            "object": "checkout.session",
            "mode": "setup",
            "customer": "cus_e2e",
            "setup_intent": {"id": "seti_e2e", "payment_method": "pm_e2e_secret"},
            "metadata": {"aza_purpose": "ai_topup_setup", "practice_id": gw.practice},
        },
    )
    assert (
        await http.post(
            "/v1/stripe/webhook", content=setup, headers={"Stripe-Signature": sign(setup)}
        )
    ).status_code == 200
    state = await gw.metering.state(gw.practice)
    assert state.license is not None and state.period is not None
    from budget.operations import Operation
    from budget.usage import Usage

    await gw.metering.record_usage(
        state.license,
        state.period,
        Usage(operation=Operation.CHAT, model="gpt-4o-mini"),
        cost_micros=20 * USD,
        request_id="spent-it-all",
    )
    charge = stripe.post(f"{STRIPE_BASE}/v1/payment_intents").mock(
        side_effect=lambda request: httpx.Response(
            200,
            json={
                "id": "pi_auto_e2e",
                "object": "payment_intent",
                "status": "succeeded",
                "amount": 3000,
                "amount_received": 3000,
                "currency": "chf",
                "metadata": {
                    k.removeprefix("metadata[").removesuffix("]"): v
                    for k, v in form(request).items()
                    if k.startswith("metadata[")
                },
            },
        )
    )
    reply = await gw.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hallo"}]
    )
    assert reply.choices[0].message.content
    assert charge.call_count == 1
    sent = form(charge.calls.last.request)
    assert sent["off_session"] == "true" and sent["confirm"] == "true"
    assert sent["metadata[aza_purpose]"] == "ai_auto_topup"
    assert (
        "Idempotency-Key" in charge.calls.last.request.headers
        or "idempotency-key" in charge.calls.last.request.headers
    )
    rows = await ledger_rows(gw.db, gw.practice)
    assert ("auto_topup_purchase", "succeeded", 10 * USD) in [
        (r["event_type"], r["status"], r["micros"]) for r in rows
    ]
    assert all("pm_e2e_secret" not in (r["meta"] or "") for r in rows)


async def test_monthly_limit_reached_tells_the_user_to_top_up_by_hand(
    http: httpx.AsyncClient, gw: Gateway, stripe: Any
) -> None:
    """Seed: at the auto limit the SDK gets 429 AUTO_TOPUP_MONTHLY_LIMIT_REACHED, 'manuell'."""
    setup = event(
        "setup_intent.succeeded",
        {
            "id": "seti_lim",
            "object": "setup_intent",
            "customer": "cus_lim",
            "payment_method": "pm_lim",
            "metadata": {"aza_purpose": "ai_topup_setup", "practice_id": gw.practice},
        },
    )
    await http.post("/v1/stripe/webhook", content=setup, headers={"Stripe-Signature": sign(setup)})
    limit = await http.put(
        "/v1/ai-credit/auto-topup/settings",
        headers=key_headers(gw),
        json={"enabled": True, "monthly_limit_chf": 30},
    )
    assert limit.status_code == 200, limit.text
    for i in range(1):
        paid = event(
            "payment_intent.succeeded",
            {
                "id": f"pi_lim_{i}",
                "object": "payment_intent",
                "status": "succeeded",
                "amount": 3000,
                "amount_received": 3000,
                "currency": "chf",
                "metadata": topup_meta(credit="10", purpose="ai_auto_topup"),
            },
        )
        await http.post(
            "/v1/stripe/webhook", content=paid, headers={"Stripe-Signature": sign(paid)}
        )
    state = await gw.metering.state(gw.practice)
    assert state.license is not None and state.period is not None
    from budget.operations import Operation
    from budget.usage import Usage

    await gw.metering.record_usage(
        state.license,
        state.period,
        Usage(operation=Operation.CHAT, model="gpt-4o-mini"),
        cost_micros=30 * USD,
        request_id="spent-all-and-credit",
    )
    charge = stripe.post(f"{STRIPE_BASE}/v1/payment_intents")
    with pytest.raises(openai.RateLimitError) as caught:
        await gw.client().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hallo"}]
        )
    body = caught.value.response.json()
    assert body["error"]["type"] == "insufficient_quota"
    assert body["error_code"] == "AUTO_TOPUP_MONTHLY_LIMIT_REACHED"
    assert "manuell" in body["message_user"].lower()
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert not charge.called
    # A manual top-up stays possible.
    manual = stripe.post(f"{STRIPE_BASE}/v1/checkout/sessions").mock(
        return_value=httpx.Response(
            200,
            json={
                "id": "cs_manual",
                "object": "checkout.session",
                "url": "https://checkout.stripe.test/m",
            },
        )
    )
    checkout = await http.post(
        "/v1/ai-credit/topup/checkout", headers=key_headers(gw), json={"amount_chf": 30}
    )
    assert checkout.status_code == 200 and manual.called
    assert json.loads(checkout.text)["checkout_url"] == "https://checkout.stripe.test/m"
