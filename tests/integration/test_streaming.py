"""Streams pass through unbuffered; cut, abandoned or usage-less streams are still charged once."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import openai
import pytest

from gateway.app import create_app
from gateway.settings import Settings
from gateway.storage import AnyDatabase
from gateway.storage.metering import MeteringStore
from tests.integration.conftest import Gateway, Upstream, serving

PROMPT = "x" * 400
# When the stream reports no usage, input is estimated: ceil(400 / 4) + 8 = 108 tokens.
ESTIMATED_INPUT_TOKENS = 108


def estimated_cost(input_tokens: int, output_tokens: int) -> int:
    """gpt-4o-mini at 0.15 / 0.60 USD per 1M tokens, rounded up to whole micro-USD."""
    return math.ceil((input_tokens * 15 + output_tokens * 60) / 100)


async def wait_until(condition: Callable[[], bool], within_seconds: float = 5.0) -> None:
    deadline = time.monotonic() + within_seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_paced_stream_reaches_the_client_before_the_upstream_finished(
    gateway: Gateway,
) -> None:
    """No buffering: the first chunk arrives while the upstream still has chunks to send."""
    gateway.fake.chunk_delay = 0.15
    stream = await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    first_at: float | None = None
    async for _chunk in stream:
        if first_at is None:
            first_at = time.monotonic()
    assert first_at is not None
    assert first_at < gateway.fake.last_chunk_sent_at - 0.5
    [event] = await gateway.settled(1)
    assert event["usage_estimated"] == 0


async def test_client_disconnect_charges_what_was_produced_once(gateway: Gateway) -> None:
    """SDK stream closed after 2 chunks: one estimated usage event, no hold, upstream closed."""
    gateway.fake.chunk_delay = 0.2
    stream = await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    received = 0
    async for _chunk in stream:
        received += 1
        if received == 2:
            break
    await stream.close()

    [event] = await gateway.settled(1)
    assert event["usage_estimated"] == 1
    assert event["status"] == "partial"
    assert event["input_tokens"] == ESTIMATED_INPUT_TOKENS
    assert 2 <= event["output_tokens"] < 10
    assert event["estimated_cost_micro_usd"] == estimated_cost(
        ESTIMATED_INPUT_TOKENS, event["output_tokens"]
    )
    assert await gateway.holds() == 0
    fake = gateway.fake
    await wait_until(lambda: fake.open_streams == 0)
    assert fake.streams_abandoned == 1
    assert fake.streams_completed == 0
    await asyncio.sleep(0.3)
    assert len(await gateway.events()) == 1


async def test_stream_cut_by_the_upstream_is_charged_as_estimated(gateway: Gateway) -> None:
    """The upstream drops the connection mid-stream: the client sees an error; usage estimated."""
    gateway.fake.cut_after_chunks = 4
    stream = await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    with pytest.raises(openai.APIError):
        async for _chunk in stream:
            pass
    [event] = await gateway.settled(1)
    assert event["usage_estimated"] == 1
    assert event["status"] == "partial"
    assert event["input_tokens"] == ESTIMATED_INPUT_TOKENS
    assert event["output_tokens"] == 4


async def test_stream_without_a_usage_chunk_is_charged_from_the_estimate(gateway: Gateway) -> None:
    """A stream that ends without usage: charged from the tap's estimate, marked estimated."""
    gateway.fake.omit_usage = True
    stream = await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert len(chunks) == 10  # role, 8 words, finish
    [event] = await gateway.settled(1)
    assert event["usage_estimated"] == 1
    assert event["status"] == "success"
    assert (event["input_tokens"], event["output_tokens"]) == (ESTIMATED_INPUT_TOKENS, 10)
    assert event["estimated_cost_micro_usd"] == estimated_cost(ESTIMATED_INPUT_TOKENS, 10)


async def test_request_cancelled_at_shutdown_still_settles(
    db: AnyDatabase,
    metering: MeteringStore,
    practice: str,
    upstream: Upstream,
    gateway_settings: Settings,
) -> None:
    """A server shutdown cancels a stream in flight; its settle still runs (one event, no hold)."""
    upstream.fake.chunk_delay = 0.5
    key = await metering.create_key(practice)
    app = create_app(gateway_settings, database=db)
    async with serving(app, graceful_shutdown_seconds=0.3) as (root, server):
        client = openai.AsyncOpenAI(base_url=root + "/v1", api_key=key, max_retries=0)
        try:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], stream=True
            )
            chunks = stream.__aiter__()
            await chunks.__anext__()
            server.should_exit = True  # uvicorn cancels the request after 0.3 s
            with pytest.raises(openai.APIError):
                async for _chunk in chunks:
                    pass
        finally:
            await client.close()
    async with db.read() as conn:
        rows = await conn.fetchall(
            "SELECT usage_estimated, status FROM ai_usage_events WHERE practice_id = ?", practice
        )
    assert [(row[0], row[1]) for row in rows] == [(1, "partial")]
    assert await metering.active_holds() == 0
