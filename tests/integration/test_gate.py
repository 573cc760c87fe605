"""The budget gate: blocked practices get an actionable 429, and holds keep concurrency honest."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from budget.operations import Operation
from budget.usage import Usage
from gateway.storage.metering import MeteringStore
from tests.integration.conftest import Gateway, StartGateway

BUDGET_MICROS = 20_000_000  # aza_basic_monthly: 20 USD a month
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 400}]}


async def spend(metering: MeteringStore, practice: str, micros: int) -> None:
    """Record earlier usage worth `micros` micro-USD in the current period."""
    state = await metering.state(practice)
    assert state.license is not None and state.period is not None
    await metering.record_usage(
        state.license,
        state.period,
        Usage(Operation.CHAT, "gpt-4o-mini", input_tokens=1, output_tokens=1),
        cost_micros=micros,
        request_id=f"earlier-{micros}",
    )


async def metric(gateway: Gateway, line_start: str) -> float:
    async with httpx.AsyncClient(base_url=gateway.root) as http:
        text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_exhausted_budget_is_a_429_the_sdk_does_not_retry(gateway: Gateway) -> None:
    """Used-up budget: RateLimitError insufficient_quota / AI_BUDGET_EXHAUSTED, asked once only."""
    await spend(gateway.metering, gateway.practice, BUDGET_MICROS)
    client = gateway.client(max_retries=2)  # the SDK's default
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(**CHAT)
    response = caught.value.response
    assert response.headers["x-should-retry"] == "false"
    body = response.json()
    error = body["error"]
    assert error["type"] == "insufficient_quota"
    assert error["code"] == "insufficient_quota"
    assert error["param"] is None
    assert body["error_code"] == error["error_code"] == "AI_BUDGET_EXHAUSTED"
    assert "Adminbereich" in body["message_user"]
    assert error["budget"]["available_usd"] == 0
    assert error["budget"]["used_usd"] == 20.0
    assert body["request_id"] == response.headers["x-request-id"]
    assert caught.value.code == "insufficient_quota"

    path = 'aza_gateway_requests_total{path="/v1/chat/completions",status="429"}'
    assert await metric(gateway, path) == 1.0
    assert await metric(gateway, 'aza_gateway_gate_decisions_total{decision="blocked"}') == 1.0
    assert gateway.fake.requests == 0
    assert len(await gateway.events()) == 1  # only the earlier usage
    assert await gateway.holds() == 0


async def test_blocked_message_in_english(
    start_gateway: StartGateway, metering: MeteringStore
) -> None:
    """user_language "en": the person-facing message is English."""
    async with start_gateway(user_language="en") as gateway:
        await spend(metering, gateway.practice, BUDGET_MICROS)
        with pytest.raises(openai.RateLimitError) as caught:
            await gateway.client().chat.completions.create(**CHAT)
        assert "admin area" in caught.value.response.json()["message_user"]


async def test_license_problems_are_403_with_their_code(gateway: Gateway) -> None:
    """An inactive license, or none at all: 403 with the seed's LICENSE_* error code."""
    now = int(time.time())
    await gateway.metering.upsert_license(
        subscription_id="sub_top",
        practice_id=gateway.practice,
        lookup_key="aza_basic_monthly",
        status="canceled",
        period_start=now - 86_400,
        period_end=now + 86_400,
    )
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await gateway.client().chat.completions.create(**CHAT)
    body = caught.value.response.json()
    assert body["error_code"] == "LICENSE_INACTIVE"
    assert body["error"]["code"] == "license_inactive"
    assert body["message_user"]

    unlicensed = await gateway.metering.create_key("prac_without_license")
    with pytest.raises(openai.PermissionDeniedError) as missing:
        await gateway.client(key=unlicensed).chat.completions.create(**CHAT)
    assert missing.value.response.json()["error_code"] == "LICENSE_MISSING"
    assert gateway.fake.requests == 0
    assert await gateway.holds() == 0


# Each request: 400 characters and max_tokens=14. The hold is the estimate,
# (ceil(400 / 4) + 8) * 0.15 + 14 * 0.60 = 24.6 -> 25 micro-USD; the charge
# is the fake upstream's usage, 100 * 0.15 + 14 * 0.60 = 23.4 -> 24.
HOLD_MICROS = 25
CHARGE_MICROS = 24
CONCURRENT = 60
ROOM_MICROS = 5 * HOLD_MICROS - 1  # room for 4 full holds and one of 24


async def test_concurrent_streams_cannot_overspend(gateway: Gateway) -> None:
    """60 concurrent streams against room for 5: exactly 5 admitted, never more than the budget."""
    await spend(gateway.metering, gateway.practice, BUDGET_MICROS - ROOM_MICROS)
    # Paced streams keep every admitted request in flight (holding its
    # estimate) until all 60 have passed the gate.
    gateway.fake.chunk_delay = 0.1
    client = gateway.client()

    async def one() -> str:
        try:
            stream = await client.chat.completions.create(**CHAT, max_tokens=14, stream=True)
        except openai.RateLimitError as exc:
            assert exc.response.json()["error_code"] == "AI_BUDGET_EXHAUSTED"
            return "blocked"
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text.startswith("Guten Tag!")
        return "answered"

    results = await asyncio.gather(*(one() for _ in range(CONCURRENT)))
    assert results.count("answered") == 5
    assert results.count("blocked") == CONCURRENT - 5

    events = await gateway.settled(1 + 5)
    new = [e for e in events if not e["request_id"].startswith("earlier-")]
    assert len(new) == 5
    assert all(e["estimated_cost_micro_usd"] == CHARGE_MICROS for e in new)
    assert all(e["usage_estimated"] == 0 for e in new)
    charged = sum(e["estimated_cost_micro_usd"] for e in new)
    assert charged <= ROOM_MICROS
    state = await gateway.metering.state(gateway.practice)
    assert state.snapshot.used_micros <= BUDGET_MICROS
    assert state.snapshot.held_micros == 0
    assert await gateway.holds() == 0
    assert gateway.fake.requests == 5
    assert await gateway.metering.totals_mismatches() == []


async def events_of(gateway: Gateway, n: int) -> list[dict[str, object]]:
    for _ in range(250):
        found = await gateway.events()
        if len(found) >= n:
            return found
        await asyncio.sleep(0.02)
    return await gateway.events()


async def test_a_practice_s_requests_share_one_lease_shown_in_metrics(
    start_gateway: StartGateway,
) -> None:
    """Five requests: the first places a lease (one hold row), the other four are admitted on it."""
    async with start_gateway(gate_lease_seconds=30.0) as gateway:  # open for the whole test
        client = gateway.client()
        for _ in range(5):
            await client.chat.completions.create(**CHAT)
        assert len(await events_of(gateway, 5)) == 5
        assert await gateway.holds() == 1  # the lease's row, its shares settled
        leases = 'aza_gateway_budget_leases_total{event="%s"}'
        assert await metric(gateway, leases % "placed") == 1.0
        assert await metric(gateway, leases % "admitted") == 4.0
        assert await metric(gateway, leases % "closed") == 0.0
    assert await gateway.holds() == 0  # shutdown closed the lease and gave the rest back


async def test_with_leases_off_every_request_holds_its_own_estimate(
    start_gateway: StartGateway,
) -> None:
    async with start_gateway(gate_lease_requests=0) as gateway:
        client = gateway.client()
        for _ in range(3):
            await client.chat.completions.create(**CHAT)
        assert len(await gateway.settled(3)) == 3
        leases = 'aza_gateway_budget_leases_total{event="%s"}'
        assert await metric(gateway, leases % "placed") == 0.0
        assert await metric(gateway, leases % "admitted") == 0.0
