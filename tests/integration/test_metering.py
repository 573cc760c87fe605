"""What practices really send, metered from what OpenAI reports: one test per row of
docs/metering.md (dictation rows are in test_dictation.py).

Each test reads the usage the SDK got back and computes the charge by hand
from config/prices.toml (USD per 1M tokens unless said otherwise); the usage
event must match it to the micro-USD (costs round up once).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import openai
import pytest

from gateway.demo.images import PNG
from tests.integration.conftest import Gateway


@pytest.fixture
async def database_url(tmp_path: Any) -> AsyncIterator[str]:
    """SQLite only: these tests meter, the storage engines are tested elsewhere."""
    yield f"sqlite:///{tmp_path / 'gateway.sqlite'}"


def cost(*parts: tuple[int, str]) -> int:
    """Sum of tokens x USD per 1M, as micro-USD rounded up."""
    return math.ceil(sum(Decimal(tokens) * Decimal(price) for tokens, price in parts))


def usd(amount: str) -> int:
    """A fee in USD as micro-USD."""
    return int(Decimal(amount) * 1_000_000)


async def one_event(gateway: Gateway) -> dict[str, Any]:
    [event] = await gateway.settled(1)
    return event


# -- service tiers -----------------------------------------------------------


async def test_priority_tier_is_billed_at_priority_prices(gateway: Gateway) -> None:
    """gpt-4o-mini asked for priority, served priority: 0.25 in, 1.00 out (not 0.15/0.60)."""
    completion = await gateway.client().chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "x" * 400}],
        service_tier="priority",
    )
    assert completion.service_tier == "priority" and completion.usage is not None
    usage = completion.usage
    event = await one_event(gateway)
    assert event["estimated_cost_micro_usd"] == cost(
        (usage.prompt_tokens, "0.25"), (usage.completion_tokens, "1.00")
    )


async def test_flex_tier_is_billed_at_flex_prices_streamed(gateway: Gateway) -> None:
    """gpt-5-mini flex, streamed Responses: the tier named in response.completed, 0.125/1.00."""
    stream = await gateway.client().responses.create(
        model="gpt-5-mini", input="y" * 200, service_tier="flex", stream=True
    )
    final: Any = None
    async for event in stream:
        if event.type == "response.completed":
            final = event.response
    assert final is not None and final.service_tier == "flex" and final.usage is not None
    event = await one_event(gateway)
    assert event["estimated_cost_micro_usd"] == cost(
        (final.usage.input_tokens, "0.125"), (final.usage.output_tokens, "1.00")
    )


async def test_auto_tier_settles_at_the_tier_served(gateway: Gateway) -> None:
    """service_tier auto, served default: standard prices (0.15 in, 0.60 out)."""
    completion = await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "z" * 40}], service_tier="auto"
    )
    assert completion.service_tier == "default" and completion.usage is not None
    event = await one_event(gateway)
    assert event["estimated_cost_micro_usd"] == cost(
        (completion.usage.prompt_tokens, "0.15"), (completion.usage.completion_tokens, "0.60")
    )


async def test_unpriced_tier_is_refused_before_forwarding(gateway: Gateway) -> None:
    """gpt-4o-mini has no flex prices: 400 service_tier_not_priced, nothing sent or charged."""
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], service_tier="flex"
        )
    assert caught.value.code == "service_tier_not_priced"
    assert gateway.fake.requests == 0
    assert await gateway.settled(0) == []


# -- built-in tools ------------------------------------------------------------


async def test_responses_tool_calls_carry_their_fees(gateway: Gateway) -> None:
    """web_search 0.010 + file_search 0.0025 + one code interpreter container 0.03 + tokens."""
    response = await gateway.client().responses.create(
        model="gpt-4.1",
        input="Suche nach AzA",
        tools=[
            {"type": "web_search"},
            {"type": "file_search", "vector_store_ids": ["vs_1"]},
            {"type": "code_interpreter", "container": {"type": "auto"}},
        ],
    )
    kinds = [item.type for item in response.output]
    assert kinds[:3] == ["web_search_call", "file_search_call", "code_interpreter_call"]
    assert response.usage is not None
    event = await one_event(gateway)
    tokens = cost((response.usage.input_tokens, "2.00"), (response.usage.output_tokens, "8.00"))
    fees = usd("0.010") + usd("0.0025") + usd("0.03")
    assert event["estimated_cost_micro_usd"] == tokens + fees


async def test_web_search_preview_fee(gateway: Gateway) -> None:
    """The preview web search tool is billed 0.025 a call."""
    response = await gateway.client().responses.create(
        model="gpt-4o", input="Suche", tools=[{"type": "web_search_preview"}]
    )
    assert response.usage is not None
    event = await one_event(gateway)
    tokens = cost((response.usage.input_tokens, "2.50"), (response.usage.output_tokens, "10.00"))
    assert event["estimated_cost_micro_usd"] == tokens + usd("0.025")


async def test_search_preview_chat_model_pays_one_search_per_request(gateway: Gateway) -> None:
    """gpt-4o-search-preview: tokens at 2.50/10.00 plus one web search (0.025) per request."""
    completion = await gateway.client().chat.completions.create(
        model="gpt-4o-search-preview", messages=[{"role": "user", "content": "Wetter Zürich"}]
    )
    assert completion.usage is not None
    event = await one_event(gateway)
    tokens = cost(
        (completion.usage.prompt_tokens, "2.50"), (completion.usage.completion_tokens, "10.00")
    )
    assert event["estimated_cost_micro_usd"] == tokens + usd("0.025")


# -- images ----------------------------------------------------------------------


async def test_gpt_image_streamed_partial_images(gateway: Gateway) -> None:
    """Streamed gpt-image-1 with 2 partial images: the completed event's usage (text 5.00,
    image output 40.00, partial images included), not the prompt alone."""
    stream = await gateway.client().images.generate(
        model="gpt-image-1", prompt="Ein Röntgenbild", stream=True, partial_images=2, quality="low"
    )
    done: Any = None
    partials = 0
    async for event in stream:
        if event.type == "image_generation.partial_image":
            partials += 1
        elif event.type == "image_generation.completed":
            done = event
    assert partials == 2 and done is not None
    usage = done.usage
    assert usage.output_tokens == 272 + 2 * 100
    event = await one_event(gateway)
    assert event["images"] == 1
    assert event["estimated_cost_micro_usd"] == cost(
        (usage.input_tokens_details.text_tokens, "5.00"), (usage.output_tokens, "40.00")
    )


async def test_gpt_image_edit_multipart(gateway: Gateway) -> None:
    """/v1/images/edits with gpt-image-1: text 5.00, input image 10.00, output 40.00."""
    result = await gateway.client().images.edit(
        model="gpt-image-1",
        image=("xray.png", PNG, "image/png"),
        prompt="Markiere die Fraktur",
        quality="medium",
    )
    assert result.usage is not None and result.data
    usage = result.usage
    assert usage.input_tokens_details.image_tokens > 0
    event = await one_event(gateway)
    assert event["operation_type"] == "image_edit"
    assert event["estimated_cost_micro_usd"] == cost(
        (usage.input_tokens_details.text_tokens, "5.00"),
        (usage.input_tokens_details.image_tokens, "10.00"),
        (usage.output_tokens, "40.00"),
    )


async def test_dalle2_variation_per_image(gateway: Gateway) -> None:
    """/v1/images/variations (dall-e-2) n=2 at 512x512: 2 x 0.018 USD."""
    with pytest.warns(DeprecationWarning):  # the SDK marks variations deprecated
        result = await gateway.client().images.create_variation(
            image=("xray.png", PNG, "image/png"), n=2, size="512x512"
        )
    assert len(result.data or []) == 2
    event = await one_event(gateway)
    assert event["operation_type"] == "image_variation"
    assert event["estimated_cost_micro_usd"] == 2 * usd("0.018")


async def test_dalle3_auto_quality_is_priced(gateway: Gateway) -> None:
    """dall-e-3 quality auto picks the best quality: priced as hd, 1024x1792 = 0.12 USD."""
    await gateway.client().images.generate(
        model="dall-e-3", prompt="Praxis", quality="auto", size="1024x1792"
    )
    event = await one_event(gateway)
    assert event["estimated_cost_micro_usd"] == usd("0.12")


# -- speech ------------------------------------------------------------------------


async def test_tts_sse_usage(gateway: Gateway) -> None:
    """gpt-4o-mini-tts with stream_format sse: speech.audio.done usage, 0.60 in, 12.00 audio out."""
    async with gateway.client().audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice="alloy",
        input="Guten Tag, Ihr Termin ist morgen.",
        instructions="Freundlich und ruhig.",
        stream_format="sse",
    ) as response:
        body = await response.read()
    done = [line for line in body.decode().splitlines() if '"speech.audio.done"' in line]
    assert len(done) == 1
    usage = json.loads(done[0].removeprefix("data: "))["usage"]
    event = await one_event(gateway)
    assert event["usage_estimated"] == 0
    assert event["estimated_cost_micro_usd"] == cost(
        (usage["input_tokens"], "0.60"), (usage["output_tokens"], "12.00")
    )


async def test_tts_without_usage_counts_instructions(gateway: Gateway) -> None:
    """Plain audio answers report nothing: input + instructions characters at 15 per 1M."""
    text, instructions = "Guten Tag.", "Ruhig."
    speech = await gateway.client().audio.speech.create(
        model="gpt-4o-mini-tts", voice="alloy", input=text, instructions=instructions
    )
    assert speech.content
    event = await one_event(gateway)
    assert event["characters"] == len(text) + len(instructions)
    assert event["estimated_cost_micro_usd"] == math.ceil(
        Decimal(len(text) + len(instructions)) * Decimal("15.00")
    )


# -- audio chat models -------------------------------------------------------------


def _audio_message() -> list[Any]:
    audio = base64.b64encode(b"RIFF a spoken question").decode()
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Bitte beantworten"},
                {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
            ],
        }
    ]


@pytest.mark.parametrize("stream", [False, True])
async def test_audio_chat_model_audio_tokens(gateway: Gateway, stream: bool) -> None:
    """gpt-4o-audio-preview: text 2.50/10.00, audio in 40.00, audio out 80.00 per 1M."""
    client = gateway.client()
    kwargs: dict[str, Any] = {
        "model": "gpt-4o-audio-preview",
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "wav"},
        "messages": _audio_message(),
    }
    if stream:
        chunks = await client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        usage: Any = None
        async for chunk in chunks:
            usage = chunk.usage or usage
    else:
        completion = await client.chat.completions.create(**kwargs)
        assert completion.choices[0].message.audio is not None
        usage = completion.usage
    assert usage is not None
    audio_in = usage.prompt_tokens_details.audio_tokens
    audio_out = usage.completion_tokens_details.audio_tokens
    assert audio_in > 0 and audio_out > 0
    event = await one_event(gateway)
    assert event["estimated_cost_micro_usd"] == cost(
        (usage.prompt_tokens - audio_in, "2.50"),
        (audio_in, "40.00"),
        (usage.completion_tokens - audio_out, "10.00"),
        (audio_out, "80.00"),
    )


# -- dated snapshots ----------------------------------------------------------------


async def test_dated_snapshot_with_its_own_price(gateway: Gateway) -> None:
    """gpt-4o-2024-05-13 costs 5.00/15.00, not gpt-4o's 2.50/10.00."""
    completion = await gateway.client().chat.completions.create(
        model="gpt-4o-2024-05-13", messages=[{"role": "user", "content": "x" * 400}]
    )
    assert completion.usage is not None
    event = await one_event(gateway)
    assert event["estimated_cost_micro_usd"] == cost(
        (completion.usage.prompt_tokens, "5.00"), (completion.usage.completion_tokens, "15.00")
    )
