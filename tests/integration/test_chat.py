"""Chat completions through the official SDK: answers, streams, and their usage events."""

from __future__ import annotations

import json

from tests.integration.conftest import Gateway

# The fake upstream counts ceil(chars / 4) prompt tokens and answers with a
# fixed 56-character text: 14 completion tokens, streamed as 8 word deltas.
PROMPT = "x" * 400  # 100 prompt tokens
# gpt-4o-mini: 0.15 USD per 1M input, 0.60 per 1M output tokens:
# 100 * 0.15 + 14 * 0.60 = 23.4 micro-USD, rounded up to 24.
CHAT_COST_MICROS = 24


async def test_chat_completion_is_answered_and_metered(gateway: Gateway) -> None:
    """A plain chat completion comes back as OpenAI sends it and is charged from its usage."""
    client = gateway.client(default_headers={"X-Device-Id": "dev-1"})
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}]
    )
    assert completion.choices[0].message.content.startswith("Guten Tag!")
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (100, 14)

    [event] = await gateway.settled(1)
    assert event["operation_type"] == "chat"
    assert event["model"] == "gpt-4o-mini"
    assert (event["input_tokens"], event["output_tokens"], event["total_tokens"]) == (100, 14, 114)
    assert event["estimated_cost_micro_usd"] == CHAT_COST_MICROS
    assert event["charged_budget_micro_usd"] == CHAT_COST_MICROS
    assert event["usage_estimated"] == 0
    assert event["device_id"] == "dev-1"
    assert event["status"] == "success"
    assert await gateway.holds() == 0


async def test_upstream_gets_its_own_key_and_none_of_the_clients_identity(gateway: Gateway) -> None:
    """The upstream sees the upstream key; the gateway key and private headers stay behind."""
    client = gateway.client(
        default_headers={
            "X-Device-Id": "dev-1",
            "X-Practice-Id": "someone-else",
            "Cookie": "session=abc",
            "OpenAI-Organization": "org-client",
            "OpenAI-Project": "proj-client",
        }
    )
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hallo"}]
    )
    headers = gateway.fake.last_headers
    assert headers["authorization"] == "Bearer sk-fake-upstream-key"
    assert gateway.key not in json.dumps(headers)
    for private in (
        "x-device-id",
        "x-practice-id",
        "cookie",
        "openai-organization",
        "openai-project",
    ):
        assert private not in headers
    assert headers["accept-encoding"] == "identity"
    assert "sk-fake-upstream-key" not in json.dumps(dict(raw.headers))
    assert raw.headers["x-request-id"].startswith("req_")


async def test_stream_without_client_usage_is_metered_and_hides_the_usage_chunk(
    gateway: Gateway,
) -> None:
    """Upstream is asked for usage; the client, who did not ask, never sees the usage chunk."""
    client = gateway.client()
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Guten Tag!")
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    assert gateway.fake.last_json["stream_options"] == {"include_usage": True}

    [event] = await gateway.settled(1)
    assert (event["input_tokens"], event["output_tokens"]) == (100, 14)
    assert event["estimated_cost_micro_usd"] == CHAT_COST_MICROS
    assert event["usage_estimated"] == 0


async def test_stream_with_client_usage_passes_the_usage_chunk(gateway: Gateway) -> None:
    """A client that asked for usage gets the usage chunk, and is charged the same."""
    client = gateway.client()
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (100, 14)

    [event] = await gateway.settled(1)
    assert event["estimated_cost_micro_usd"] == CHAT_COST_MICROS
