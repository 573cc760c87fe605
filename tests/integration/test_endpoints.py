"""Every forwarded OpenAI endpoint through the official SDK, each with its usage event.

Costs are hand-computed from config/prices.toml and the fake upstream's
usage (about one token per four characters; a fixed 14-token answer).
Costs round up to whole micro-USD.
"""

from __future__ import annotations

import base64
import io
import struct
import wave

import openai
import pytest

from tests.integration.conftest import Gateway


def wav(seconds: float, rate: int = 8000) -> bytes:
    """A silent mono 16-bit WAV file of `seconds` seconds."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\0\0" * int(seconds * rate))
    return buffer.getvalue()


async def test_responses_api_plain(gateway: Gateway) -> None:
    """Responses API: 100 input + 14 output tokens of gpt-4o-mini = 15 + 8.4 -> 24 micro-USD."""
    response = await gateway.client().responses.create(model="gpt-4o-mini", input="x" * 400)
    assert response.output_text.startswith("Guten Tag!")
    [event] = await gateway.settled(1)
    assert event["operation_type"] == "responses"
    assert (event["input_tokens"], event["output_tokens"]) == (100, 14)
    assert event["estimated_cost_micro_usd"] == 24
    assert event["usage_estimated"] == 0


async def test_responses_api_streamed(gateway: Gateway) -> None:
    """A streamed response ends with response.completed; usage is read from that event."""
    stream = await gateway.client().responses.create(
        model="gpt-4o-mini", input="x" * 400, stream=True
    )
    events = [event async for event in stream]
    assert events[0].type == "response.created"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas).startswith("Guten Tag!")
    assert events[-1].type == "response.completed"
    [event] = await gateway.settled(1)
    assert event["estimated_cost_micro_usd"] == 24
    assert event["usage_estimated"] == 0


async def test_legacy_completions(gateway: Gateway) -> None:
    """gpt-3.5-turbo-instruct: 10 prompt tokens * 1.50 + 14 * 2.00 per 1M = 43 micro-USD."""
    completion = await gateway.client().completions.create(
        model="gpt-3.5-turbo-instruct", prompt="p" * 40
    )
    assert completion.choices[0].text.startswith("Guten Tag!")
    [event] = await gateway.settled(1)
    assert event["operation_type"] == "completion"
    assert event["estimated_cost_micro_usd"] == 43


async def test_embeddings_base64_float_and_dimensions(gateway: Gateway) -> None:
    """Embeddings: the SDK's default base64 and float encodings; 1000 tokens * 0.02 per 1M = 20."""
    client = gateway.client()
    result = await client.embeddings.create(model="text-embedding-3-small", input="y" * 4000)
    assert len(result.data[0].embedding) == 1536
    floats = await client.embeddings.create(
        model="text-embedding-3-small",
        input=["y" * 4000],
        dimensions=8,
        encoding_format="float",
    )
    assert len(floats.data[0].embedding) == 8
    packed = await client.embeddings.create(
        model="text-embedding-3-small", input="y" * 4000, dimensions=8, encoding_format="base64"
    )
    raw = base64.b64decode(packed.data[0].embedding)  # type: ignore[arg-type]
    assert struct.unpack("<8f", raw) == pytest.approx(floats.data[0].embedding, rel=1e-6)

    events = await gateway.settled(3)
    assert [e["operation_type"] for e in events] == ["embedding"] * 3
    assert [e["input_tokens"] for e in events] == [1000] * 3
    assert [e["estimated_cost_micro_usd"] for e in events] == [20] * 3


async def test_audio_transcription_and_translation(gateway: Gateway) -> None:
    """Multipart uploads: 6 s of audio at 0.006 USD a minute = 600 micro-USD each."""
    client = gateway.client()
    audio = ("dictation.wav", wav(6.0), "audio/wav")
    transcript = await client.audio.transcriptions.create(model="whisper-1", file=audio)
    assert transcript.text.startswith("Dies ist eine Transkription")
    as_text = await client.audio.transcriptions.create(
        model="whisper-1", file=audio, response_format="text"
    )
    assert isinstance(as_text, str) and as_text.startswith("Dies ist")
    # openai 3.x marks the translations endpoint deprecated; it still calls it.
    with pytest.warns(DeprecationWarning):
        translation = await client.audio.translations.create(model="whisper-1", file=audio)
    assert translation.text

    events = await gateway.settled(3)
    assert [e["operation_type"] for e in events] == [
        "transcription",
        "transcription",
        "translation",
    ]
    assert [float(e["audio_seconds"]) for e in events] == [6.0, 6.0, 6.0]
    assert [e["estimated_cost_micro_usd"] for e in events] == [600, 600, 600]


async def test_audio_speech_returns_binary_audio(gateway: Gateway) -> None:
    """Speech: the audio bytes come back as sent; 1000 characters of tts-1 = 15000 micro-USD."""
    speech = await gateway.client().audio.speech.create(
        model="tts-1", voice="alloy", input="z" * 1000
    )
    audio = speech.content
    assert audio.startswith(b"\xff\xfb")
    assert speech.response.headers["content-type"] == "audio/mpeg"
    assert int(speech.response.headers["content-length"]) == len(audio)
    [event] = await gateway.settled(1)
    assert event["operation_type"] == "speech"
    assert event["characters"] == 1000
    assert event["estimated_cost_micro_usd"] == 15_000


async def test_image_generation(gateway: Gateway) -> None:
    """dall-e-3 standard 1024x1024: 0.040 USD an image = 40000 micro-USD."""
    result = await gateway.client().images.generate(
        model="dall-e-3", prompt="a cat", size="1024x1024", response_format="b64_json"
    )
    assert result.data is not None
    assert base64.b64decode(result.data[0].b64_json or "").startswith(b"\x89PNG")
    [event] = await gateway.settled(1)
    assert event["operation_type"] == "image"
    assert event["images"] == 1
    assert event["estimated_cost_micro_usd"] == 40_000


async def test_moderation_is_recorded_at_no_cost(gateway: Gateway) -> None:
    """Moderations are free upstream: one usage event costing 0."""
    result = await gateway.client().moderations.create(
        model="omni-moderation-latest", input="hello"
    )
    assert result.results[0].flagged is False
    [event] = await gateway.settled(1)
    assert event["operation_type"] == "moderation"
    assert event["estimated_cost_micro_usd"] == 0


async def test_models_are_listed_and_retrieved_without_metering(gateway: Gateway) -> None:
    """GET /v1/models and /v1/models/{id} are forwarded, need a key, and cost nothing."""
    client = gateway.client()
    models = [model.id async for model in client.models.list()]
    assert "gpt-4o-mini" in models
    model = await client.models.retrieve("gpt-4o-mini")
    assert model.id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        await gateway.client(key="aza_wrong").models.list()
    assert await gateway.events() == []
