"""Issue 12's holes, tried as an attacker would, against a running gateway over loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.demo.fake_upstream import FAKE_UPSTREAM_KEY
from gateway.limits import JSON_ROUTE_BODY_BYTES, WEBHOOK_BODY_BYTES
from gateway.settings import Secret
from tests.credit.helpers import WEBHOOK_SECRET, sign
from tests.integration.conftest import Gateway, StartGateway
from tests.integration.rawhttp import chunked_flood, raw_request

SERVICE_TOKEN = "svc-token-for-security-tests"
SETTINGS: dict[str, Any] = {
    "api_token": Secret(SERVICE_TOKEN),
    "stripe_webhook_secret": Secret(WEBHOOK_SECRET),
}
LEDGER_ROWS = "SELECT COUNT(*) FROM ai_credit_ledger"


@pytest.fixture
async def gw(start_gateway: StartGateway) -> AsyncIterator[Gateway]:
    async with start_gateway(**SETTINGS) as gateway:
        yield gateway


@pytest.fixture
async def http(gw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gw.root, timeout=10) as client:
        yield client


def auth(gw: Gateway) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.key}"}


async def rows(gw: Gateway, sql: str) -> int:
    async with gw.db.read() as conn:
        return int(await conn.fetchval(sql))


# -- 3. bodies are bounded before they are read ------------------------------------------


@pytest.mark.parametrize(
    ("target", "limit", "with_key"),
    [
        ("/v1/stripe/webhook", WEBHOOK_BODY_BYTES, False),
        ("/v1/ai-credit/topup/checkout", JSON_ROUTE_BODY_BYTES, True),
        ("/v1/admin/practices/p/adjustments", JSON_ROUTE_BODY_BYTES, False),
    ],
)
async def test_a_declared_oversize_body_is_refused_unread(
    gw: Gateway, target: str, limit: int, with_key: bool
) -> None:
    """A Content-Length above the route's limit gets 413 before a byte of the body is sent."""
    headers = {
        **(auth(gw) if with_key else {"Authorization": f"Bearer {SERVICE_TOKEN}"}),
        "Content-Length": str(100 * 1024 * 1024),
        "Content-Type": "application/json",
    }
    # The head alone: the server must answer without waiting for the 100 MB.
    response = await raw_request(gw.root, "POST", target, headers=headers)
    assert response.status == 413
    assert json.loads(response.body)["error"]["code"] == "request_too_large"
    assert str(limit) in json.loads(response.body)["error"]["message"]
    assert await rows(gw, LEDGER_ROWS) == 0


@pytest.mark.parametrize(
    "target",
    ["/v1/stripe/webhook", "/v1/ai-credit/topup/checkout", "/v1/ai-credit/auto-topup/settings"],
)
async def test_a_chunked_flood_is_cut_at_the_limit(gw: Gateway, target: str) -> None:
    """A 200 MB chunked POST (garbage signature, no key) is answered 413 after about the limit."""
    headers = {"Stripe-Signature": "t=1,v1=garbage", "Authorization": f"Bearer {gw.key}"}
    response = await chunked_flood(gw.root, target, headers=headers)
    assert response.status in (413, 405)
    if response.status == 413:
        assert json.loads(response.body)["error"]["code"] == "request_too_large"
    # The server stopped reading near the limit; TCP buffers hold the rest.
    assert response.sent_body_bytes < 32 * 1024 * 1024


async def test_checkout_body_over_the_limit(gw: Gateway, http: httpx.AsyncClient) -> None:
    """A 1 MB JSON body to the checkout route is refused (it was accepted before)."""
    padding = "x" * (1024 * 1024)
    response = await http.post(
        "/v1/ai-credit/topup/checkout", headers=auth(gw), json={"amount_chf": 30, "pad": padding}
    )
    assert response.status_code == 413


# -- 4. upstream error text ---------------------------------------------------------------


async def test_upstream_error_echoing_the_key_is_redacted(
    gw: Gateway, http: httpx.AsyncClient
) -> None:
    """An upstream error that quotes the upstream key keeps OpenAI's shape, not the key."""
    key = FAKE_UPSTREAM_KEY
    gw.fake.errors.append(
        (
            400,
            {
                "error": {
                    "message": f"Bad request for key {key} (Bearer {key})",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "bad",
                },
                "debug": {"authorization": f"Bearer {FAKE_UPSTREAM_KEY}"},
            },
        )
    )
    response = await http.post(
        "/v1/chat/completions",
        headers=auth(gw),
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 400
    assert FAKE_UPSTREAM_KEY not in response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "messages" and body["error"]["code"] == "bad"
    assert body["error"]["message"].startswith("Bad request for key [redacted]")


async def test_upstream_error_that_is_not_openai_shaped(
    gw: Gateway, http: httpx.AsyncClient
) -> None:
    """A non-OpenAI error body (a proxy's page) becomes a gateway message naming the status."""
    gw.fake.errors.append((502, f"<html>upstream proxy saw sk-live-{FAKE_UPSTREAM_KEY}</html>"))
    response = await http.post(
        "/v1/chat/completions",
        headers=auth(gw),
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 502
    assert FAKE_UPSTREAM_KEY not in response.text
    assert response.json()["error"]["code"] == "upstream_error"


# -- 5. webhook failures are not 500s -------------------------------------------------------


async def test_signed_webhook_that_is_not_json_is_400(gw: Gateway, http: httpx.AsyncClient) -> None:
    """A correctly signed body that is not JSON answers 400, which Stripe does not retry."""
    for body in (b"this is not json", b"[" * 50_000 + b"]" * 50_000):
        response = await http.post(
            "/v1/stripe/webhook", content=body, headers={"Stripe-Signature": sign(body)}
        )
        assert response.status_code == 400, response.text
        assert response.json()["error_code"] == "INVALID_WEBHOOK_PAYLOAD"
    assert await rows(gw, "SELECT COUNT(*) FROM stripe_webhook_events") == 0


async def test_webhook_without_secret_is_503(start_gateway: StartGateway) -> None:
    """With STRIPE_WEBHOOK_SECRET unset the webhook answers 503 (retry later), not 500."""
    async with start_gateway() as gw, httpx.AsyncClient(base_url=gw.root) as http:
        body = b'{"id": "evt_1", "type": "x", "data": {"object": {}}}'
        response = await http.post(
            "/v1/stripe/webhook", content=body, headers={"Stripe-Signature": sign(body)}
        )
    assert response.status_code == 503
    assert response.json()["error_code"] == "STRIPE_WEBHOOK_NOT_CONFIGURED"


# -- 7. odd input is a 4xx, not a traceback --------------------------------------------------


async def test_deeply_nested_messages_are_refused_without_a_traceback(
    gw: Gateway, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """messages nested 650, 900 and 5,000 levels deep: a 400, never a 500 or a traceback."""
    caplog.set_level(logging.WARNING)
    for depth in (650, 900, 5_000):
        nested = "[" * depth + '"x"' + "]" * depth
        message = f'{{"role":"user","content":{nested}}}'
        body = f'{{"model":"gpt-4o-mini","stream":true,"messages":[{message}]}}'
        response = await http.post(
            "/v1/chat/completions",
            headers={**auth(gw), "Content-Type": "application/json"},
            content=body.encode(),
        )
        assert response.status_code == 400, (depth, response.text)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


@pytest.mark.parametrize("messages", ['"hello"', "42", "{}", '["text"]', "null"])
async def test_messages_that_are_not_an_array_of_messages(
    gw: Gateway, http: httpx.AsyncClient, messages: str
) -> None:
    """messages as a string, number, object or array of non-objects is a 400; nothing forwarded."""
    body = f'{{"model":"gpt-4o-mini","messages":{messages}}}'
    response = await http.post(
        "/v1/chat/completions",
        headers={**auth(gw), "Content-Type": "application/json"},
        content=body.encode(),
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
    assert gw.fake.requests == 0
    assert await gw.holds() == 0


@pytest.mark.parametrize(
    "limit", ["²", "١٢", "1e3", "-1", "0x10", " 5", "", "99999999999999999999"]
)
async def test_odd_history_limits_are_refused(
    gw: Gateway, http: httpx.AsyncClient, limit: str
) -> None:
    """?limit=² and other values int() or the range refuse: 422 invalid_limit, not 500."""
    response = await http.get("/v1/ai-credit/history", params={"limit": limit}, headers=auth(gw))
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_limit"


# -- 1. and 2. only exact endpoints reach the upstream, only for a practice --------------------


@pytest.mark.parametrize(
    "target",
    [
        "/v1/models/%2e%2e/files",
        "/v1/models/%2e%2e",
        "/v1/models/..",
        "/v1/models/../files",
        "/v1/models/a%2Ffiles",
        "/v1/chat/completions/%2e%2e",
        "/v1/chat/completions/x%2F..%2F..%2Ffiles",
        "/v1/models/?after=x",
        "/v1//models",
        "/v1/fine_tuning/jobs",
        "/v1/vector_stores/vs_1/files",
        "/v1/files/%2e%2e/content",
    ],
)
async def test_paths_outside_the_table_never_reach_the_upstream(gw: Gateway, target: str) -> None:
    """Traversal, encoded slashes, empty segments and unlisted paths: a 4xx, no upstream call."""
    response = await raw_request(gw.root, "GET", target, headers=auth(gw))
    assert 400 <= response.status < 500
    assert json.loads(response.body)["error"]["code"] in ("invalid_path", "unknown_url")
    assert gw.fake.requests == 0


@pytest.mark.parametrize("with_key", [False, True])
@pytest.mark.parametrize("target", ["/v1/models", "/v1/models/gpt-4o-mini"])
async def test_head_is_not_forwarded(gw: Gateway, target: str, with_key: bool) -> None:
    """HEAD on a forwarded GET path answers 405 and calls no upstream, with or without a key."""
    response = await raw_request(gw.root, "HEAD", target, headers=auth(gw) if with_key else {})
    assert response.status == 405
    assert gw.fake.requests == 0


async def test_no_upstream_call_without_a_practice(gw: Gateway) -> None:
    """No key, a wrong key, or the service token without X-Practice-Id: nothing is forwarded."""
    for headers in (
        {},
        {"Authorization": "Bearer aza_wrong"},
        {"Authorization": f"Bearer {SERVICE_TOKEN}"},
    ):
        response = await raw_request(gw.root, "GET", "/v1/models/gpt-4o-mini", headers=headers)
        assert response.status in (400, 401)
    assert gw.fake.requests == 0


async def test_a_listed_model_path_is_forwarded_as_the_template_says(gw: Gateway) -> None:
    """An escaped model id reaches the upstream as the template's path, escaped the SDK's way."""
    response = await raw_request(gw.root, "GET", "/v1/models/gpt-4o%2Dmini", headers=auth(gw))
    assert response.status == 200
    assert gw.fake.last_path == "/v1/models/gpt-4o-mini"
    assert gw.fake.last_headers["authorization"] == f"Bearer {FAKE_UPSTREAM_KEY}"


# -- 9. a running request keeps its hold -----------------------------------------------------


async def test_a_stream_longer_than_the_hold_ttl_keeps_its_hold(
    start_gateway: StartGateway,
) -> None:
    """A stream running for over twice hold_ttl_seconds still holds its estimate at the end."""
    async with start_gateway(hold_ttl_seconds=1, gate_lease_requests=0) as gw:
        gw.fake.chunk_delay = 0.4
        stream = await gw.client().chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Bitte einen langen Brief " * 20}],
            stream=True,
        )
        started = time.monotonic()
        held_late: int | None = None
        async for _chunk in stream:
            if time.monotonic() - started > 2.5:
                state = await gw.metering.state(gw.practice)
                held_late = state.snapshot.held_micros
                break
        await stream.close()
        assert held_late is not None, "the stream ended before the hold TTL had passed twice"
        assert held_late > 0
        await gw.settled(1)
        assert await gw.holds() == 0


# -- 8. requests without an output limit cannot overspend -------------------------------------


async def test_burst_without_output_limit_stays_within_the_budget(
    start_gateway: StartGateway,
) -> None:
    """100 concurrent requests naming no max_tokens against a nearly empty budget: what the
    admitted ones cost stays within what was available (the fake answers 14 tokens unless
    limited; the gateway holds and forwards 2)."""
    from tests.integration.test_gate import spend

    room = 200
    async with start_gateway(default_max_output_tokens=2, gate_lease_requests=0) as gw:
        await spend(gw.metering, gw.practice, 20_000_000 - room)
        gw.fake.hang_seconds = 0.2  # every admitted request holds while the others arrive
        async with httpx.AsyncClient(base_url=gw.root, timeout=20) as http:

            async def one() -> httpx.Response:
                return await http.post(
                    "/v1/chat/completions",
                    headers=auth(gw),
                    json={
                        "model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": "x" * 400}],
                    },
                )

            responses = await asyncio.gather(*(one() for _ in range(100)))
        admitted = [r for r in responses if r.status_code == 200]
        assert admitted and all(r.status_code in (200, 429) for r in responses)
        events = await gw.settled(1 + len(admitted))
        charged = sum(
            e["estimated_cost_micro_usd"]
            for e in events
            if not e["request_id"].startswith("earlier")
        )
        assert charged <= room
        assert all(1 <= int(r.headers["x-aza-max-output-tokens"]) <= 2 for r in admitted)
        assert gw.fake.last_json["max_completion_tokens"] in (1, 2)
        assert all(e["usage_estimated"] == 0 for e in events[1:])


async def test_the_last_admitted_request_gets_the_output_its_partial_hold_affords(
    start_gateway: StartGateway,
) -> None:
    """Room for one and a bit: the first request gets the full limit (64), the second the
    tokens what is left affords (48: 108 input tokens at 0.15 and 48 at 0.60 per 1M make 45
    micro-USD), the third a 429."""
    from tests.integration.test_gate import spend

    async with start_gateway(default_max_output_tokens=64, gate_lease_requests=0) as gw:
        await spend(gw.metering, gw.practice, 20_000_000 - 100)
        gw.fake.hang_seconds = 0.3
        async with httpx.AsyncClient(base_url=gw.root, timeout=20) as http:

            async def one() -> httpx.Response:
                return await http.post(
                    "/v1/chat/completions",
                    headers=auth(gw),
                    json={
                        "model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": "x" * 400}],
                    },
                )

            responses = await asyncio.gather(*(one() for _ in range(3)))
        assert sorted(r.status_code for r in responses) == [200, 200, 429]
        limits = sorted(
            int(r.headers["x-aza-max-output-tokens"]) for r in responses if r.status_code == 200
        )
        assert limits == [48, 64]
        await gw.settled(3)
        assert await gw.holds() == 0


@pytest.mark.parametrize(
    "target",
    [
        "/v1/files?limit=%C2%B2",
        "/v1/ai-credit/usage?from=%C2%B2",
    ],
)
async def test_odd_digits_in_other_queries(gw: Gateway, target: str) -> None:
    """The same "²" in the Files list and the usage report: a 4xx, not a 500."""
    response = await raw_request(gw.root, "GET", target, headers=auth(gw))
    assert 400 <= response.status < 500, response.body


async def test_batch_json_bodies_are_bounded(gw: Gateway) -> None:
    """The Batch API's JSON body has the 64 KiB limit of the gateway's own JSON routes."""
    headers = {
        **auth(gw),
        "Content-Length": str(10 * 1024 * 1024),
        "Content-Type": "application/json",
    }
    response = await raw_request(gw.root, "POST", "/v1/batches", headers=headers)
    assert response.status == 413
