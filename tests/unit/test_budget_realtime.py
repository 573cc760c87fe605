"""Realtime usage, prices and estimates (budget/realtime.py), without I/O."""

from __future__ import annotations

from decimal import Decimal

from budget.operations import Operation
from budget.pricing import PriceBook
from budget.realtime import (
    SessionKind,
    SessionMeter,
    event_type,
    response_usage,
    transcription_model_of,
    transcription_usage,
)
from budget.usage import Usage
from config import CONFIG_DIR

PRICES = PriceBook.load(CONFIG_DIR / "prices.toml")

DONE_USAGE = {
    "total_tokens": 1300,
    "input_tokens": 1000,
    "output_tokens": 300,
    "input_token_details": {
        "text_tokens": 200,
        "audio_tokens": 800,
        "cached_tokens": 600,
        "cached_tokens_details": {"text_tokens": 100, "audio_tokens": 500},
    },
    "output_token_details": {"text_tokens": 50, "audio_tokens": 250},
}


def test_event_type_is_read_from_the_first_bytes_only_when_it_leads() -> None:
    """Both separators the SDK and OpenAI write; anything else is left to a full parse."""
    assert event_type('{"type":"response.done","response":{}}') == "response.done"
    assert event_type('{"type": "input_audio_buffer.append", "audio": "AAAA"}') == (
        "input_audio_buffer.append"
    )
    assert event_type('{"event_id":"e1","type":"response.done"}') is None
    assert event_type('{"type":"resp\\u006fnse.done"}') is None


def test_a_response_done_usage_keeps_its_audio_and_cached_parts() -> None:
    usage = response_usage("gpt-realtime", {"id": "resp_1", "usage": DONE_USAGE})
    assert usage == Usage(
        Operation.REALTIME,
        "gpt-realtime",
        input_tokens=1000,
        cached_input_tokens=600,
        output_tokens=300,
        audio_input_tokens=800,
        cached_audio_input_tokens=500,
        audio_output_tokens=250,
    )
    assert response_usage("gpt-realtime", {"id": "resp_1", "usage": None}) is None


def test_gpt_realtime_prices_each_kind_of_token_at_its_own_rate() -> None:
    """Text 100 new + 100 cached in, audio 300 new + 500 cached in, 50 text + 250 audio out."""
    usage = response_usage("gpt-realtime", {"usage": DONE_USAGE})
    assert usage is not None
    expected = (
        Decimal(100) * Decimal("4.00")
        + Decimal(100) * Decimal("0.40")
        + Decimal(300) * Decimal("32.00")
        + Decimal(500) * Decimal("0.40")
        + Decimal(50) * Decimal("16.00")
        + Decimal(250) * Decimal("64.00")
    ) / Decimal(1_000_000)
    assert PRICES.cost_usd(usage) == expected
    assert PRICES.cost_micros(usage) == 27_040


def test_image_input_of_a_response_is_priced_at_the_image_rate() -> None:
    """A conversation with an image: 300 image tokens (100 of them cached) among 1,000 text
    and 200 audio. Images new at gpt-realtime's image input rate, cached ones at the cached
    input rate, the text at the text rate."""
    usage = response_usage(
        "gpt-realtime",
        {
            "usage": {
                "input_tokens": 1500,
                "output_tokens": 0,
                "input_token_details": {
                    "text_tokens": 1000,
                    "audio_tokens": 200,
                    "image_tokens": 300,
                    "cached_tokens": 400,
                    "cached_tokens_details": {
                        "text_tokens": 300,
                        "audio_tokens": 0,
                        "image_tokens": 100,
                    },
                },
            }
        },
    )
    assert usage is not None and usage.image_input_tokens == 200
    expected = (
        Decimal(700) * Decimal("4.00")
        + Decimal(400) * Decimal("0.40")
        + Decimal(200) * Decimal("32.00")
        + Decimal(200) * Decimal("5.00")
    ) / Decimal(1_000_000)
    assert PRICES.cost_usd(usage) == expected


def test_transcription_usage_in_tokens_or_in_seconds() -> None:
    tokens = transcription_usage(
        "gpt-4o-transcribe",
        {
            "type": "tokens",
            "input_tokens": 120,
            "input_token_details": {"text_tokens": 20, "audio_tokens": 100},
            "output_tokens": 30,
            "total_tokens": 150,
        },
    )
    assert tokens == Usage(
        Operation.REALTIME_TRANSCRIPTION,
        "gpt-4o-transcribe",
        input_tokens=120,
        output_tokens=30,
        audio_input_tokens=100,
    )
    # 20 text x 2.50 + 100 audio x 6.00 + 30 x 10.00 per 1M tokens.
    assert PRICES.cost_usd(tokens) == Decimal("0.00095")
    seconds = transcription_usage("whisper-1", {"type": "duration", "seconds": 90})
    assert seconds == Usage(
        Operation.REALTIME_TRANSCRIPTION, "whisper-1", audio_seconds=Decimal(90)
    )
    assert PRICES.cost_usd(seconds) == Decimal("0.009")  # 1.5 min x 0.006
    # Without a breakdown every input token counts as audio, the dearer kind.
    bare = transcription_usage(
        "gpt-4o-transcribe", {"type": "tokens", "input_tokens": 50, "output_tokens": 5}
    )
    assert bare is not None and bare.audio_input_tokens == 50
    assert transcription_usage("gpt-4o-transcribe", {"type": "bogus"}) is None


def test_the_next_response_is_held_at_what_it_reads_and_may_write() -> None:
    """Context of the last response, plus a second of committed audio; output as audio."""
    meter = SessionMeter(SessionKind.CONVERSATION, model="gpt-realtime", max_output_tokens=500)
    first = meter.response_estimate()
    assert (first.input_tokens, first.output_tokens, first.audio_output_tokens) == (8, 500, 500)
    last = response_usage("gpt-realtime", {"usage": DONE_USAGE})
    assert last is not None
    meter.answered(last)
    meter.appended(64_000)  # base64 of 48,000 bytes: one second of 24 kHz PCM16
    assert meter.committed() == Decimal(1)
    estimate = meter.response_estimate(max_output_tokens=200)
    assert estimate.estimated
    assert estimate.input_tokens == 1300 + 10 + 8
    assert estimate.audio_input_tokens == 800 + 250 + 10
    assert estimate.cached_input_tokens == 0  # held as uncached: an upper bound
    assert (estimate.output_tokens, estimate.audio_output_tokens) == (200, 200)
    assert PRICES.cost_micros(estimate) > PRICES.cost_micros(last)


def test_a_session_configures_its_estimates_from_what_the_upstream_reports() -> None:
    meter = SessionMeter(SessionKind.CONVERSATION, model="gpt-realtime")
    meter.configure(
        {
            "type": "realtime",
            "model": "gpt-realtime-mini",
            "output_modalities": ["text"],
            "max_output_tokens": 300,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcmu"},
                    "transcription": {"model": "whisper-1"},
                }
            },
        }
    )
    assert (meter.model, meter.max_output_tokens, meter.audio_output) == (
        "gpt-realtime-mini",
        300,
        False,
    )
    assert meter.transcription_model == "whisper-1"
    meter.appended(8_000 * 4 // 3 + 1)  # one second of G.711, in base64
    assert meter.committed() == Decimal(1)
    assert transcription_model_of({"input_audio_transcription": {"model": "x"}}) == "x"


def test_a_transcription_segment_is_held_by_its_length() -> None:
    meter = SessionMeter(
        SessionKind.TRANSCRIPTION, model="", transcription_model="gpt-4o-mini-transcribe"
    )
    short = meter.transcription_estimate(Decimal(2))
    long = meter.transcription_estimate(Decimal(20))
    assert short.model == "gpt-4o-mini-transcribe" and short.audio_seconds == 2
    assert PRICES.cost_micros(short) < PRICES.cost_micros(long)
    assert meter.transcription_estimate().audio_seconds == 30
