"""Alerts end to end: thresholds crossed by real requests, sent by email and signed webhook."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
import respx

from budget.usage import Operation, Usage
from gateway.alerts.signing import SIGNATURE_HEADER, verify
from gateway.settings import Secret
from gateway.storage import AnyDatabase
from tests.alerts.conftest import Channels
from tests.alerts.receivers import wait_for
from tests.credit.helpers import (
    STRIPE_BASE,
    STRIPE_HTTPX_DEPRECATION,
    WEBHOOK_SECRET,
    card_error,
    save,
)
from tests.integration.conftest import Gateway, StartGateway, serve

USD = 1_000_000
CHAT: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hallo"}]}


async def put_alerts(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=gateway.root) as http:
        response = await http.put(
            "/v1/ai-credit/alerts", json=body, headers={"authorization": f"Bearer {gateway.key}"}
        )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def spend(gateway: Gateway, micros: int, request_id: str) -> None:
    """Usage written as an import would (no request), to bring the budget near a threshold."""
    state = await gateway.metering.state(gateway.practice)
    assert state.license is not None and state.period is not None
    await gateway.metering.record_usage(
        state.license,
        state.period,
        Usage(Operation.CHAT, "gpt-4o-mini"),
        cost_micros=micros,
        request_id=request_id,
    )


async def outbox_settled(db: AnyDatabase, practice: str) -> bool:
    async with db.read() as conn:
        left = await conn.fetchval(
            "SELECT COUNT(*) FROM ai_alert_outbox WHERE practice_id = ? AND done_at IS NULL",
            practice,
        )
    return int(left) == 0


async def test_crossing_80_percent_sends_one_email_and_one_signed_webhook(
    start_gateway: StartGateway, channels: Channels, db: AnyDatabase
) -> None:
    """A request that takes the budget past 80 % sends one email and one webhook; the
    signature verifies; more usage in the same period sends nothing more."""
    async with start_gateway(**channels.overrides) as gateway:
        answer = await put_alerts(
            gateway,
            {
                "budget_used_percent": [80],
                "email": "praxis@example.test",
                "webhook_url": channels.webhook_url,
                "language": "de",
            },
        )
        secret = answer["webhook_secret"]
        assert secret.startswith("whsec_")
        async with httpx.AsyncClient(base_url=gateway.root) as http:
            shown = await http.get(
                "/v1/ai-credit/alerts", headers={"authorization": f"Bearer {gateway.key}"}
            )
        assert "webhook_secret" not in shown.json() and shown.json()["webhook_secret_set"]

        await spend(gateway, 16 * USD - 1, "before-80")  # 20 USD budget: 1 micro-USD short
        assert channels.receiver.deliveries == []
        client = gateway.client()
        await client.chat.completions.create(**CHAT)
        await wait_for(lambda: channels.inbox.messages and channels.receiver.deliveries)

        [delivery] = channels.receiver.deliveries
        body = delivery.body
        assert body["type"] == "budget.threshold_crossed"
        assert body["id"].startswith("alrt_") and body["practice_id"] == gateway.practice
        assert body["data"]["threshold_percent"] == 80
        assert body["data"]["budget_usd"] == "20.00"
        assert verify(
            secret, delivery.headers[SIGNATURE_HEADER.lower()], delivery.raw, now=int(time.time())
        )
        assert not verify(
            secret,
            delivery.headers[SIGNATURE_HEADER.lower()],
            delivery.raw + b" ",
            now=int(time.time()),
        )
        [mail] = channels.inbox.messages
        assert mail["To"] == "praxis@example.test"
        assert mail["Subject"] == "KI-Budget: 80 % verbraucht"

        budget = await client.get("/ai-credit/budget", cast_to=httpx.Response)
        pending = budget.json()["alerts_pending"]
        assert [(p["id"], p["type"]) for p in pending] == [(body["id"], "budget.threshold_crossed")]

        # More usage in the period, past 80 % again: nothing new.
        await client.chat.completions.create(**CHAT)
        await spend(gateway, 1 * USD, "after-80")
        await gateway.settled(3)
        await wait_for(lambda: outbox_settled(db, gateway.practice))
        await asyncio.sleep(0.2)  # several polls
        assert len(channels.receiver.deliveries) == 1
        assert len(channels.inbox.messages) == 1


@pytest.mark.filterwarnings(STRIPE_HTTPX_DEPRECATION)
async def test_failed_auto_topup_notice_is_in_french(
    start_gateway: StartGateway, channels: Channels, db: AnyDatabase
) -> None:
    """A background auto top-up declined by Stripe: the practice set to French gets the
    failure and the pause by email, in French, and by webhook."""
    with respx.mock(assert_all_called=False) as stripe:
        stripe.route(host="127.0.0.1").pass_through()
        stripe.post(f"{STRIPE_BASE}/v1/payment_intents").mock(
            return_value=card_error("card_declined", decline_code="insufficient_funds")
        )
        async with start_gateway(
            stripe_secret_key=Secret("sk_test_alerts"),
            stripe_api_base=STRIPE_BASE,
            stripe_webhook_secret=Secret(WEBHOOK_SECRET),
            topup_dry_run=False,
            auto_topup_enabled=True,
            **channels.overrides,
        ) as gateway:
            await put_alerts(
                gateway,
                {
                    "budget_used_percent": [],
                    "email": "cabinet@example.test",
                    "webhook_url": channels.webhook_url,
                    "language": "fr",
                },
            )
            await save(db, trigger=10, practice=gateway.practice)
            await spend(gateway, 20 * USD - 1_500_000, "earlier")
            await gateway.client().chat.completions.create(**CHAT)
            await wait_for(lambda: len(channels.inbox.messages) >= 2)
            await wait_for(lambda: outbox_settled(db, gateway.practice))

    assert sorted(channels.inbox.subjects()) == [
        "Recharge automatique suspendue",
        "Échec de la recharge automatique",
    ]
    types = sorted(d.body["type"] for d in channels.receiver.deliveries)
    assert types == ["auto_topup.failed", "auto_topup.paused"]
    failed = next(
        d.body for d in channels.receiver.deliveries if d.body["type"] == "auto_topup.failed"
    )
    assert failed["data"]["amount_chf"] == "30.00"
    for delivery in channels.receiver.deliveries:
        assert "pm_" not in delivery.raw.decode() and "sk_test" not in delivery.raw.decode()


async def test_a_receiver_down_gets_the_alert_once_it_is_back(
    start_gateway: StartGateway, channels: Channels, db: AnyDatabase
) -> None:
    """The receiver answers 503 for a while: the alert is retried with backoff, with the same
    id, and arrives once the receiver answers again."""
    down = True
    attempts: list[int] = []

    def status() -> int:
        attempts.append(1)
        return 503 if down else 200

    channels.receiver.status = status
    async with start_gateway(**channels.overrides) as gateway:
        await put_alerts(
            gateway, {"budget_used_percent": [50], "webhook_url": channels.webhook_url}
        )
        await spend(gateway, 9 * USD, "first")
        await gateway.client().chat.completions.create(**CHAT)
        await spend(gateway, 2 * USD, "crossing")
        await wait_for(lambda: len(attempts) >= 3)
        assert channels.receiver.deliveries == []
        down = False
        await wait_for(lambda: channels.receiver.deliveries)
        await wait_for(lambda: outbox_settled(db, gateway.practice))
        [delivery] = channels.receiver.deliveries
        rows = await gateway_alerts(db, gateway.practice)
        assert [(r["id"], r["webhook_state"], r["email_state"]) for r in rows] == [
            (delivery.body["id"], "sent", "off")
        ]
        assert int(rows[0]["attempts"]) >= 3


async def gateway_alerts(db: AnyDatabase, practice: str) -> list[Any]:
    async with db.read() as conn:
        return list(
            await conn.fetchall(
                "SELECT * FROM ai_alert_outbox WHERE practice_id = ? ORDER BY created_at", practice
            )
        )


async def test_a_webhook_that_redirects_is_not_followed(
    start_gateway: StartGateway, channels: Channels, db: AnyDatabase
) -> None:
    """A 302 from the receiver is a failed delivery: the gateway never follows it."""
    followed: list[str] = []

    async def target(scope: Any, receive: Any, send: Any) -> None:
        followed.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with serve(target) as inner:

        async def redirect(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            headers = [(b"location", (inner + "/internal").encode())]
            await send({"type": "http.response.start", "status": 302, "headers": headers})
            await send({"type": "http.response.body", "body": b""})

        async with (
            serve(redirect) as outer,
            start_gateway(**{**channels.overrides, "alert_max_attempts": 2}) as gateway,
        ):
            await put_alerts(gateway, {"budget_used_percent": [10], "webhook_url": outer + "/x"})
            await spend(gateway, 3 * USD, "crossing")
            await wait_for(lambda: outbox_settled(db, gateway.practice))
            rows = await gateway_alerts(db, gateway.practice)
    assert [r["webhook_state"] for r in rows] == ["failed"]
    assert "HTTP 302" in rows[0]["last_error"]
    assert followed == []


async def test_a_receiver_that_never_ends_its_answer_does_not_hold_delivery_up(
    start_gateway: StartGateway, channels: Channels, db: AnyDatabase
) -> None:
    """A receiver answers 200 and then streams its body forever: the alert counts as sent
    on the status, and the worker goes on (it did wait for the body's end before)."""
    chunks: list[int] = []

    async def endless(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while not gone.is_set():  # until the gateway hangs up
            chunks.append(1)
            await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
            await asyncio.sleep(0.01)
        await watcher

    async with serve(endless) as url, start_gateway(**channels.overrides) as gateway:
        await put_alerts(gateway, {"budget_used_percent": [10], "webhook_url": url + "/x"})
        await spend(gateway, 3 * USD, "crossing")
        await wait_for(lambda: outbox_settled(db, gateway.practice))
        rows = await gateway_alerts(db, gateway.practice)
    assert [r["webhook_state"] for r in rows] == ["sent"]
    assert chunks


async def test_a_webhook_target_is_checked_again_at_delivery(
    start_gateway: StartGateway, channels: Channels, db: AnyDatabase
) -> None:
    """A loopback http URL saved while the operator allowed private targets is not called once
    they are no longer allowed: each delivery checks the target again, and fails."""
    async with start_gateway(**channels.overrides) as gateway:
        await put_alerts(
            gateway, {"budget_used_percent": [10], "webhook_url": channels.webhook_url}
        )
    strict = {**channels.overrides, "alert_webhook_allow_private": False, "alert_max_attempts": 2}
    async with start_gateway(**strict) as gateway:
        await spend(gateway, 3 * USD, "crossing")
        await wait_for(lambda: outbox_settled(db, gateway.practice))
        rows = await gateway_alerts(db, gateway.practice)
    assert [r["webhook_state"] for r in rows] == ["failed"]
    assert rows[0]["last_error"].startswith("webhook: webhook_url must")  # http, loopback
    assert channels.receiver.deliveries == []


async def test_bad_alert_settings_are_refused_and_change_nothing(
    start_gateway: StartGateway,
) -> None:
    """A loopback webhook (operator has not allowed private ones), a bad percent, language or
    email: 422 in the OpenAI shape, the settings as they were; a client key gets 403."""
    async with start_gateway() as gateway:
        before = await put_alerts(gateway, {"email": "praxis@example.test", "language": "it"})
        assert before["email_enabled"] is False  # no AZA_SMTP_URL / AZA_ALERT_FROM
        async with httpx.AsyncClient(base_url=gateway.root) as http:
            auth = {"authorization": f"Bearer {gateway.key}"}
            for body, code in [
                ({"webhook_url": "https://127.0.0.1/hook"}, "invalid_webhook_url"),
                ({"webhook_url": "http://example.com/hook"}, "invalid_webhook_url"),
                ({"budget_used_percent": [0, 80]}, "invalid_percent"),
                ({"key_cap_percent": "80"}, "invalid_percent"),
                ({"language": "es"}, "invalid_language"),
                ({"email": "a@b.test, c@d.test"}, "invalid_email"),
                ({"extra_credit_below_usd": "-1"}, "invalid_amount"),
                ({"extra_credit_below_usd": "1e30"}, "invalid_amount"),
                ({"extra_credit_below_usd": "0.0000001"}, "invalid_amount"),
                ({"email": 5}, "invalid_email"),
                ({"webhook_url": ["https://example.com"]}, "invalid_webhook_url"),
                ({"webhook_secret": "whsec_mine"}, "unknown_field"),
                ({"budget_used_percents": [50]}, "unknown_field"),
            ]:
                # A good change beside the bad one must not be stored either.
                response = await http.put(
                    "/v1/ai-credit/alerts", json={"language": "fr", **body}, headers=auth
                )
                assert response.status_code == 422, body
                error = response.json()["error"]
                assert error["code"] == code, body
                assert error["param"] == next(iter(body)), body
            after = await http.get("/v1/ai-credit/alerts", headers=auth)
            assert after.json() == before
            # A GET's answer PUT back is taken as it is (its read-only fields ignored).
            again = await http.put("/v1/ai-credit/alerts", json=after.json(), headers=auth)
            assert again.status_code == 200, again.text
            assert again.json() == before
            unauthenticated = await http.get("/v1/ai-credit/alerts")
            assert unauthenticated.status_code == 401
            client_key = {"authorization": f"Bearer {gateway.client_key}"}
            for method in ("GET", "PUT"):
                refused = await http.request(
                    method, "/v1/ai-credit/alerts", json={"email": None}, headers=client_key
                )
                assert refused.status_code == 403
                assert refused.json()["error"]["code"] == "admin_key_required"
            assert (await http.get("/v1/ai-credit/alerts", headers=auth)).json() == before
