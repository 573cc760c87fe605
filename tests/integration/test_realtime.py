"""Realtime sessions through the gateway, driven by the official SDK's realtime client.

The fake upstream's `/v1/realtime` WebSocket (gateway/demo/realtime.py)
answers turn by turn; every test goes over real loopback sockets.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from budget.pricing import PriceBook
from budget.realtime import SessionKind, SessionMeter
from budget.usage import Operation, Usage
from config import CONFIG_DIR
from tests.integration.conftest import Gateway, StartGateway

PRICES = PriceBook.load(CONFIG_DIR / "prices.toml")
USD = 1_000_000
# A tenth of a second of 24 kHz 16-bit mono silence, as the SDK would send it.
AUDIO_100MS = base64.b64encode(bytes(4_800)).decode()


async def until(condition: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    """Wait until `condition()` holds (checked every 20 ms), or fail after `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def next_of(connection: Any, kind: str) -> Any:
    """Read events until one of `kind` arrives; return it."""
    while True:
        event = await connection.recv()
        if event.type == kind:
            return event


async def speak(connection: Any, tenths: int = 10) -> None:
    for _ in range(tenths):
        await connection.input_audio_buffer.append(audio=AUDIO_100MS)
    await connection.input_audio_buffer.commit()


async def turn(connection: Any, **response: Any) -> tuple[Any, list[str]]:
    """One spoken turn and its response: the `response.done` event and the event types seen."""
    await speak(connection)
    await connection.response.create(**({"response": response} if response else {}))
    seen: list[str] = []
    while True:
        event = await connection.recv()
        seen.append(event.type)
        if event.type == "response.done":
            return event, seen


def cost_of(done: Any, model: str) -> int:
    usage = done.response.usage
    details = usage.input_token_details
    return PRICES.cost_micros(
        Usage(
            Operation.REALTIME,
            model,
            input_tokens=usage.input_tokens,
            cached_input_tokens=details.cached_tokens,
            output_tokens=usage.output_tokens,
            audio_input_tokens=details.audio_tokens,
            cached_audio_input_tokens=details.cached_tokens_details.audio_tokens,
            audio_output_tokens=usage.output_token_details.audio_tokens,
        )
    )


async def realtime_events(gateway: Gateway) -> list[dict[str, Any]]:
    return [e for e in await gateway.events() if e["request_id"].startswith("rt:")]


async def leave_available(gateway: Gateway, micros: int) -> None:
    """Record other usage so that `micros` of the practice's budget are left."""
    state = await gateway.metering.state(gateway.practice)
    assert state.license is not None and state.period is not None
    await gateway.metering.record_usage(
        state.license,
        state.period,
        Usage(Operation.CHAT, "gpt-4o-mini"),
        cost_micros=state.snapshot.available_micros - micros,
        request_id=f"elsewhere-{state.snapshot.available_micros}",
    )


async def test_a_voice_conversation_of_three_responses_is_charged_per_response(
    gateway: Gateway,
) -> None:
    """Three turns: every event relayed in order, three usage events at gpt-realtime's rates."""
    fake = gateway.fake.realtime
    async with gateway.client().realtime.connect(model="gpt-realtime") as connection:
        created = await next_of(connection, "session.created")
        dones = []
        for _ in range(3):
            done, seen = await turn(connection)
            dones.append(done)
            assert seen.count("response.output_audio.delta") == fake.deltas
            assert seen[0] == "input_audio_buffer.committed"
            assert seen.index("response.created") < seen.index("response.output_audio.delta")
    events = await gateway.settled(3)
    assert [e["request_id"] for e in events] == [
        f"rt:{created.session.id}:{done.response.id}" for done in dones
    ]
    for event, done in zip(events, dones, strict=True):
        assert event["operation_type"] == "realtime"
        assert event["model"] == "gpt-realtime"
        assert event["input_tokens"] == done.response.usage.input_tokens
        assert event["cached_input_tokens"] == done.response.usage.input_token_details.cached_tokens
        assert event["output_tokens"] == done.response.usage.output_tokens
        assert event["estimated_cost_micro_usd"] == cost_of(done, "gpt-realtime") > 0
        assert event["usage_estimated"] == 0 and event["status"] == "success"
    # Later turns read earlier ones as cached input, at the cached rates.
    assert dones[2].response.usage.input_token_details.cached_tokens > 0
    # The upstream got the upstream key, never the gateway key, and every client event.
    assert fake.last_headers["authorization"] == "Bearer sk-fake-upstream-key"
    assert fake.client_events.count("response.create") == 3
    assert fake.client_events.count("input_audio_buffer.append") == 30
    assert await gateway.holds() == 0
