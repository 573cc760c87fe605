"""Dictation through the gateway: every audio format, every transcription model and format.

The audio files are encoded by the tests themselves (tests/audio_files.py).
Costs are computed by hand in each test from config/prices.toml and the
usage the fake upstream reported, as OpenAI bills them:

- gpt-4o-transcribe: 2.50 text input, 6.00 audio input, 10.00 output per 1M
  tokens; gpt-4o-mini-transcribe: 1.25, 3.00, 5.00.
- whisper-1 (and answers without usage): 0.006 USD a minute, whole seconds
  rounded up.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.audio_files import FORMATS, MIME, encode, webm_recording
from tests.integration.conftest import Gateway


@pytest.fixture
async def database_url(tmp_path: Any) -> AsyncIterator[str]:
    """SQLite only: these tests meter, the storage engines are tested elsewhere."""
    yield f"sqlite:///{tmp_path / 'gateway.sqlite'}"


# One browser dictation of 13 s, as Chrome's MediaRecorder writes it (WebM/Opus,
# no duration in its header).
DICTATION_SECONDS = 13
PROMPT = "Praxis Dr. Muster, Befund"


@pytest.fixture(scope="module")
def dictation() -> tuple[str, bytes, str]:
    return ("dictation.webm", webm_recording(DICTATION_SECONDS), "audio/webm")


def micros(usd_per_1m_times_tokens: Decimal) -> int:
    """USD x 1M (a sum of tokens x per-1M prices) as micro-USD, rounded up."""
    return math.ceil(usd_per_1m_times_tokens)


def per_second_micros(seconds: int, per_minute_usd: str) -> int:
    """Whole seconds at a per-minute price, in micro-USD rounded up."""
    return math.ceil(Decimal(seconds) * Decimal(per_minute_usd) * 1_000_000 / 60)


@pytest.mark.parametrize("extension", sorted(FORMATS))
async def test_every_format_is_billed_its_length(gateway: Gateway, extension: str) -> None:
    """whisper-1 text answers carry no usage: the upload's own length (3 s) is billed."""
    audio = (f"note.{extension}", encode(extension, 3.0), MIME[extension])
    text = await gateway.client().audio.transcriptions.create(
        model="whisper-1", file=audio, response_format="text"
    )
    assert text.startswith("Dies ist eine Transkription")
    [event] = await gateway.settled(1)
    assert float(event["audio_seconds"]) == 3.0
    assert event["estimated_cost_micro_usd"] == per_second_micros(3, "0.006") == 300
    assert event["usage_estimated"] == 1


@pytest.mark.parametrize(
    ("model", "text_in", "audio_in", "out"),
    [
        ("gpt-4o-transcribe", "2.50", "6.00", "10.00"),
        ("gpt-4o-mini-transcribe", "1.25", "3.00", "5.00"),
    ],
)
async def test_webm_dictation_token_billed(
    gateway: Gateway,
    dictation: tuple[str, bytes, str],
    model: str,
    text_in: str,
    audio_in: str,
    out: str,
) -> None:
    """A browser dictation is charged its audio, prompt and output tokens, plain and streamed."""
    client = gateway.client()
    plain = await client.audio.transcriptions.create(model=model, file=dictation, prompt=PROMPT)
    assert plain.usage is not None and plain.usage.type == "tokens"
    usage = plain.usage
    assert usage.input_token_details is not None
    audio_tokens = usage.input_token_details.audio_tokens or 0
    text_tokens = usage.input_token_details.text_tokens or 0
    assert audio_tokens > 200 and text_tokens > 0  # 13 s of audio, a prompt
    expected = micros(
        text_tokens * Decimal(text_in)
        + audio_tokens * Decimal(audio_in)
        + usage.output_tokens * Decimal(out)
    )

    stream = await client.audio.transcriptions.create(
        model=model, file=dictation, prompt=PROMPT, stream=True
    )
    done: Any = None
    async for event in stream:
        if event.type == "transcript.text.done":
            done = event
    assert done is not None and done.usage is not None
    assert done.usage.input_tokens == usage.input_tokens

    events = await gateway.settled(2)
    assert [e["estimated_cost_micro_usd"] for e in events] == [expected, expected]
    assert [e["usage_estimated"] for e in events] == [0, 0]
    assert [e["input_tokens"] for e in events] == [usage.input_tokens] * 2
    assert expected > 0


async def test_webm_dictation_text_format_priced_per_minute(
    gateway: Gateway, dictation: tuple[str, bytes, str]
) -> None:
    """gpt-4o-transcribe text answers report no usage: 13 s at OpenAI's 0.006/min estimate."""
    text = await gateway.client().audio.transcriptions.create(
        model="gpt-4o-transcribe", file=dictation, response_format="text"
    )
    assert text.startswith("Dies ist")
    [event] = await gateway.settled(1)
    assert event["estimated_cost_micro_usd"] == per_second_micros(13, "0.006") == 1300
    assert event["usage_estimated"] == 1


@pytest.mark.parametrize("response_format", ["json", "verbose_json", "text", "srt", "vtt"])
async def test_webm_dictation_whisper_every_format(
    gateway: Gateway, dictation: tuple[str, bytes, str], response_format: Any
) -> None:
    """whisper-1: 13 s at 0.006 USD a minute = 1300 micro-USD whatever the answer's format."""
    client = gateway.client()
    answer = await client.audio.transcriptions.create(
        model="whisper-1", file=dictation, response_format=response_format
    )
    if response_format == "json":
        assert answer.usage.type == "duration" and answer.usage.seconds == 13
    [event] = await gateway.settled(1)
    assert float(event["audio_seconds"]) == DICTATION_SECONDS
    assert event["estimated_cost_micro_usd"] == per_second_micros(13, "0.006") == 1300
    reported = response_format in ("json", "verbose_json")
    assert event["usage_estimated"] == (0 if reported else 1)


async def test_webm_dictation_whisper_stream_flag(
    gateway: Gateway, dictation: tuple[str, bytes, str]
) -> None:
    """whisper-1 does not stream: stream=true gets the JSON answer, billed the same 13 s."""
    async with httpx.AsyncClient(base_url=gateway.base_url) as http:
        response = await http.post(
            "/audio/transcriptions",
            headers={"Authorization": f"Bearer {gateway.key}"},
            data={"model": "whisper-1", "stream": "true"},
            files={"file": dictation},
        )
    assert response.status_code == 200
    assert response.json()["usage"] == {"type": "duration", "seconds": 13}
    [event] = await gateway.settled(1)
    assert event["estimated_cost_micro_usd"] == 1300


async def test_webm_dictation_translation(
    gateway: Gateway, dictation: tuple[str, bytes, str]
) -> None:
    """A translation reports no usage in json: the upload's 13 s are billed (estimated)."""
    with pytest.warns(DeprecationWarning):  # the SDK marks translations deprecated
        translation = await gateway.client().audio.translations.create(
            model="whisper-1", file=dictation
        )
    assert translation.text
    [event] = await gateway.settled(1)
    assert event["operation_type"] == "translation"
    assert event["estimated_cost_micro_usd"] == 1300
    assert event["usage_estimated"] == 1


@pytest.mark.parametrize("response_format", ["text", "srt", "vtt"])
async def test_unreadable_upload_without_usage_is_refused(
    gateway: Gateway, response_format: Any
) -> None:
    """No length and no usage to come: 400 before forwarding, nothing charged (never 600 s)."""
    before = gateway.fake.requests
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().audio.transcriptions.create(
            model="whisper-1",
            file=("note.webm", b"\x1a\x45\xdf\xa3 not really a recording", "audio/webm"),
            response_format=response_format,
        )
    assert caught.value.code == "audio_duration_unreadable"
    assert caught.value.param == "file"
    assert gateway.fake.requests == before
    assert await gateway.settled(0) == []
    assert await gateway.holds() == 0


async def test_unreadable_upload_with_usage_is_forwarded_and_refused_upstream(
    gateway: Gateway,
) -> None:
    """json answers report usage, so the gateway forwards; OpenAI's 400 releases the hold."""
    with pytest.raises(openai.BadRequestError):
        await gateway.client().audio.transcriptions.create(
            model="gpt-4o-transcribe", file=("note.ogg", b"OggS broken", "audio/ogg")
        )
    assert gateway.fake.requests == 1
    assert await gateway.settled(0) == []
    assert await gateway.holds() == 0
