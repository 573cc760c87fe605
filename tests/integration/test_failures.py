"""Failures in the OpenAI error shape, and none of them charges or leaves a hold."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from budget.pricing import PlanBook
from gateway.app import create_app
from gateway.settings import Settings
from gateway.storage import AnyDatabase
from gateway.storage.metering import MeteringStore
from tests.integration.conftest import Gateway, StartGateway, serve

CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "x" * 400}],
}


def assert_openai_shape(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict)
    error = body["error"]
    assert set(error) >= {"message", "type", "code", "param"}
    return dict(error)


async def assert_nothing_written(gateway: Gateway) -> None:
    # A released hold goes after the response was sent: wait for it.
    assert await gateway.settled(0) == []
    assert await gateway.holds() == 0


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, openai.BadRequestError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
async def test_upstream_error_passes_through_and_charges_nothing(
    gateway: Gateway, status: int, error_class: type[openai.APIStatusError]
) -> None:
    """An upstream 4xx/5xx reaches the client as sent; the hold is released, nothing charged."""
    upstream_body = {
        "error": {
            "message": "upstream says no",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    gateway.fake.errors.append((status, upstream_body))
    with pytest.raises(error_class) as caught:
        await gateway.client().chat.completions.create(**CHAT)
    assert caught.value.status_code == status
    assert caught.value.response.json() == upstream_body
    assert gateway.fake.requests == 1
    await assert_nothing_written(gateway)


async def test_upstream_refusing_our_key_is_a_502_without_its_body(gateway: Gateway) -> None:
    """An upstream 401 concerns the gateway's own key: 502, and OpenAI's echo of it stays out."""
    upstream_body = {
        "error": {
            "message": "Incorrect API key provided: sk-fake-********-key.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    gateway.fake.errors.append((401, upstream_body))
    with pytest.raises(openai.InternalServerError) as caught:
        await gateway.client().chat.completions.create(**CHAT)
    assert caught.value.status_code == 502
    error = assert_openai_shape(caught.value.response.json())
    assert error["code"] == "upstream_auth_failed"
    assert "sk-" not in caught.value.response.text
    await assert_nothing_written(gateway)


async def test_upstream_timeout_is_a_504_and_charges_nothing(start_gateway: StartGateway) -> None:
    """An upstream that does not answer in time: 504 in the OpenAI shape, hold released."""
    async with start_gateway(upstream_timeout_seconds=0.3) as gateway:
        gateway.fake.hang_seconds = 2.0
        with pytest.raises(openai.InternalServerError) as caught:
            await gateway.client().chat.completions.create(**CHAT)
        assert caught.value.status_code == 504
        error = assert_openai_shape(caught.value.response.json())
        assert error["code"] == "upstream_timeout"
        await assert_nothing_written(gateway)


async def test_unreachable_upstream_is_a_502(start_gateway: StartGateway) -> None:
    """A connection error to the upstream: 502 in the OpenAI shape, hold released."""
    async with start_gateway(upstream_base_url="http://127.0.0.1:9/v1") as gateway:
        with pytest.raises(openai.InternalServerError) as caught:
            await gateway.client().chat.completions.create(**CHAT)
        assert caught.value.status_code == 502
        assert_openai_shape(caught.value.response.json())
        await assert_nothing_written(gateway)


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """A raw HTTP client, for requests the SDK cannot make (bad JSON, chunked bodies)."""
    async with httpx.AsyncClient(
        base_url=gateway.root, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=10
    ) as client:
        yield client


async def test_invalid_json_is_a_400(gateway: Gateway, http: httpx.AsyncClient) -> None:
    """A body that is not JSON: 400 invalid_json, nothing forwarded or written."""
    response = await http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = assert_openai_shape(response.json())
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_json"
    assert gateway.fake.requests == 0
    await assert_nothing_written(gateway)


async def test_body_over_the_limit_is_a_413_before_it_is_read(start_gateway: StartGateway) -> None:
    """Over max_request_body_bytes: 413 by Content-Length, and while reading a chunked body."""
    async with start_gateway(max_request_body_bytes=1_000) as gateway:
        with pytest.raises(openai.APIStatusError) as caught:
            await gateway.client().chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 2_000}]
            )
        assert caught.value.status_code == 413
        assert assert_openai_shape(caught.value.response.json())["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}]}'

        async with httpx.AsyncClient(base_url=gateway.root, timeout=10) as http:
            response = await http.post(
                "/v1/chat/completions",
                content=chunks(),
                headers={"Authorization": f"Bearer {gateway.key}"},
            )
        assert response.status_code == 413
        assert "content-length" not in response.request.headers  # it was sent chunked
        assert_openai_shape(response.json())
        assert gateway.fake.requests == 0
        await assert_nothing_written(gateway)


async def test_unknown_paths_are_404_in_the_openai_shape(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    """Paths under /v1 that are neither forwarded nor gateway routes: 404, nothing forwarded."""
    client = gateway.client()
    with pytest.raises(openai.NotFoundError) as caught:
        await client.get("/no-such-thing", cast_to=object)
    assert_openai_shape(caught.value.response.json())
    for method, path in (
        ("POST", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/chat/completions/abc/extra"),
        ("GET", "/x"),
    ):
        response = await http.request(method, path, content=b"{}")
        assert response.status_code in (404, 405), (method, path)
        assert_openai_shape(response.json())
    assert gateway.fake.requests == 0
    await assert_nothing_written(gateway)


async def test_missing_or_invalid_key_is_a_401(gateway: Gateway) -> None:
    """No key or a wrong key: 401 invalid_api_key; nothing forwarded or written."""
    with pytest.raises(openai.AuthenticationError) as caught:
        await gateway.client(key="aza_not-a-real-key").chat.completions.create(**CHAT)
    assert assert_openai_shape(caught.value.response.json())["code"] == "invalid_api_key"
    async with httpx.AsyncClient(base_url=gateway.root) as http:
        response = await http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 401
    assert_openai_shape(response.json())
    assert gateway.fake.requests == 0
    await assert_nothing_written(gateway)


async def test_unpriced_model_is_refused_before_forwarding(gateway: Gateway) -> None:
    """Policy reject: a model without a price gets 400 model_not_priced and never goes upstream."""
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().chat.completions.create(**{**CHAT, "model": "gpt-unknown-9"})
    error = assert_openai_shape(caught.value.response.json())
    assert error["code"] == "model_not_priced"
    assert error["param"] == "model"
    assert gateway.fake.requests == 0
    await assert_nothing_written(gateway)


async def test_unpriced_model_with_fallback_policy_is_charged_at_the_fallback_price(
    start_gateway: StartGateway,
) -> None:
    """Policy fallback: charged as gpt-4o, 100 * 2.50 + 14 * 10.00 per 1M = 390 micro-USD."""
    async with start_gateway(unpriced_model_policy="fallback", fallback_model="gpt-4o") as gateway:
        completion = await gateway.client().chat.completions.create(
            **{**CHAT, "model": "gpt-unknown-9"}
        )
        assert completion.choices[0].message.content
        [event] = await gateway.settled(1)
        assert event["model"] == "gpt-unknown-9"
        assert event["estimated_cost_micro_usd"] == 390


async def test_readiness_and_health(gateway: Gateway, http: httpx.AsyncClient) -> None:
    """/healthz answers without the upstream; /readyz checks the database; /metrics counts."""
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    assert (await http.get("/readyz")).status_code == 200
    await gateway.client().chat.completions.create(**CHAT)
    await gateway.settled(1)
    metrics = (await http.get("/metrics")).text
    assert 'aza_gateway_requests_total{path="/v1/chat/completions",status="200"} 1.0' in metrics
    assert "aza_gateway_usage_cost_micro_usd_total 24.0" in metrics
    assert "aza_gateway_holds_in_flight 0.0" in metrics
    assert 'aza_gateway_gate_decisions_total{decision="admitted"} 1.0' in metrics
    assert "aza_gateway_upstream_latency_seconds_count" in metrics
    assert gateway.fake.requests == 1  # health and metrics never touched the upstream
    json.loads((await http.get("/healthz")).text)


async def test_readiness_is_503_when_the_database_is_down(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    """/readyz answers 503 in the OpenAI shape when the database does not; /healthz stays up."""
    await gateway.db.close()
    response = await http.get("/readyz")
    assert response.status_code == 503
    assert assert_openai_shape(response.json())["type"] == "server_error"
    assert (await http.get("/healthz")).status_code == 200


async def test_a_stream_just_under_the_limit_is_forwarded(start_gateway: StartGateway) -> None:
    """The include_usage the gateway adds does not push a body under the limit over it."""
    body_size = len(
        json.dumps(
            {
                "messages": [{"role": "user", "content": "x" * 900}],
                "model": "gpt-4o-mini",
                "stream": True,
            },
            separators=(",", ":"),
        )
    )
    async with start_gateway(max_request_body_bytes=body_size + 5) as gateway:
        stream = await gateway.client().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 900}], stream=True
        )
        assert [chunk async for chunk in stream]
        assert len(gateway.fake.last_body) > body_size + 5
        [event] = await gateway.settled(1)
        assert event["usage_estimated"] == 0


async def test_background_sweep_drops_expired_holds(
    db: AnyDatabase, practice: str, plans: PlanBook, gateway_settings: Settings
) -> None:
    """The maintenance task deletes holds past their expiry (left by a crashed gateway)."""
    crashed = MeteringStore(db, plans=plans, hold_ttl_seconds=0)
    reservation = await crashed.reserve(practice, request_id="crashed", estimate_micros=100)
    assert reservation.admitted
    assert await crashed.active_holds() == 1
    app = create_app(gateway_settings, database=db, maintenance_interval=0.05)
    async with serve(app):
        for _ in range(100):
            if await crashed.active_holds() == 0:
                break
            await asyncio.sleep(0.02)
    assert await crashed.active_holds() == 0
