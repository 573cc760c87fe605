"""What the fake upstream answers to transcriptions and translations, as OpenAI does.

Lengths are read with the gateway's own reader (PyAV), so an upload OpenAI
could not read is refused here too. whisper-1 reports `usage.seconds`
(whole seconds, rounded up) in `json` and `verbose_json`; the
gpt-4o-transcribe family reports token usage (`input_token_details` with
audio and text tokens) in `json`, `diarized_json` and in the
`transcript.text.done` event of a stream. `text`, `srt` and `vtt` answers
are plain text without usage; translations (`json`) carry none either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from budget.audio import audio_duration_seconds, billed_seconds
from gateway.demo.answers import Streamed, error_body, tokens_for
from gateway.demo.sse import sse_event

TRANSCRIPT = "Dies ist eine Transkription des AzA-Demo-Upstreams."
# Audio tokens the fake counts per second of audio (OpenAI's 0.006 USD a
# minute at 6 USD per 1M audio tokens is 1000 a minute).
AUDIO_TOKENS_PER_SECOND = Decimal(1000) / Decimal(60)


@dataclass(frozen=True)
class PlainText:
    """A plain-text answer (text, srt, vtt) and its media type."""

    body: str
    media_type: str


@dataclass(frozen=True)
class Refused:
    """An error answer: status and OpenAI error body."""

    status: int
    body: dict[str, Any]


def audio_tokens(seconds: Decimal) -> int:
    """The fake's audio input tokens for `seconds` of audio."""
    return max(1, math.ceil(seconds * AUDIO_TOKENS_PER_SECOND))


def token_usage(seconds: Decimal, prompt: str, text: str) -> dict[str, Any]:
    """A `usage` of type tokens for a transcription of `seconds` with `prompt`."""
    audio = audio_tokens(seconds)
    prompt_tokens = tokens_for(prompt) if prompt else 0
    out = tokens_for(text)
    return {
        "type": "tokens",
        "input_tokens": audio + prompt_tokens,
        "input_token_details": {"text_tokens": prompt_tokens, "audio_tokens": audio},
        "output_tokens": out,
        "total_tokens": audio + prompt_tokens + out,
    }


def _timestamp(seconds: float, sep: str) -> str:
    whole = int(seconds)
    millis = round((seconds - whole) * 1000)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}{sep}{millis:03d}"


def answer(
    audio: bytes, *, model: str, response_format: str, task: str, prompt: str, stream: bool
) -> dict[str, Any] | PlainText | Streamed | Refused:
    """The answer to one transcription (`task` "transcribe") or translation ("translate")."""
    length = audio_duration_seconds(audio)
    if length is None:
        return Refused(
            400,
            error_body(
                "Audio file might be corrupted or unsupported",
                type="invalid_request_error",
                code="invalid_value",
            ),
        )
    seconds = float(length)
    billed = int(billed_seconds(length, measured=True))
    text = TRANSCRIPT
    token_model = model != "whisper-1"
    if task == "transcribe" and token_model and stream:
        words = text.split(" ")
        chunks = [
            sse_event(
                "transcript.text.delta",
                {
                    "type": "transcript.text.delta",
                    "delta": word + (" " if i < len(words) - 1 else ""),
                },
            )
            for i, word in enumerate(words)
        ]
        done = {
            "type": "transcript.text.done",
            "text": text,
            "usage": token_usage(length, prompt, text),
        }
        return Streamed([*chunks, sse_event("transcript.text.done", done)])
    if response_format == "text":
        return PlainText(text + "\n", "text/plain")
    if response_format == "srt":
        cue = f"1\n{_timestamp(0, ',')} --> {_timestamp(seconds, ',')}\n{text}\n\n"
        return PlainText(cue, "text/plain")
    if response_format == "vtt":
        cue = f"WEBVTT\n\n{_timestamp(0, '.')} --> {_timestamp(seconds, '.')}\n{text}\n\n"
        return PlainText(cue, "text/vtt")
    duration_usage = {"type": "duration", "seconds": billed}
    if response_format == "verbose_json":
        body: dict[str, Any] = {
            "task": task,
            "language": "english" if task == "translate" else "german",
            "duration": seconds,
            "text": text,
            "segments": [
                {
                    "id": 0,
                    "seek": 0,
                    "start": 0.0,
                    "end": seconds,
                    "text": text,
                    "tokens": [],
                    "temperature": 0.0,
                    "avg_logprob": -0.1,
                    "compression_ratio": 1.0,
                    "no_speech_prob": 0.0,
                }
            ],
        }
        if task == "transcribe":
            body["usage"] = duration_usage
        return body
    if task == "translate":
        return {"text": text}
    if not token_model:
        return {"text": text, "usage": duration_usage}
    usage = token_usage(length, prompt, text)
    if response_format == "diarized_json":
        return {
            "task": "transcribe",
            "duration": seconds,
            "text": text,
            "segments": [
                {
                    "type": "transcript.text.segment",
                    "id": "seg_001",
                    "start": 0.0,
                    "end": seconds,
                    "text": text,
                    "speaker": "A",
                }
            ],
            "usage": usage,
        }
    return {"text": text, "usage": usage}
