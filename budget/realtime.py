"""Realtime sessions: what a response or a transcription used, and what the next one may cost.

A Realtime session (OpenAI's `/v1/realtime` WebSocket) is metered per
upstream event: each `response.done` by its `usage`, each
`conversation.item.input_audio_transcription.completed` by its own. Before
a response (or the transcription of a committed input buffer) the gateway
holds an estimate of it; `SessionMeter` keeps what that estimate needs (the
conversation's size so far, the audio appended since) from the events it is
told about. Nothing here does I/O or parses more than it is handed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from budget.estimate import REQUEST_OVERHEAD_TOKENS
from budget.operations import Operation
from budget.request import CHARS_PER_TOKEN
from budget.usage import Usage

# User audio is about one token per 100 ms (OpenAI's Realtime guide).
INPUT_AUDIO_TOKENS_PER_SECOND = 10
# A transcript: fast speech is about three words (five tokens) a second; held at 8.
TRANSCRIPT_TOKENS_PER_SECOND = 8
# The segment held for a transcription the server's voice detection commits
# before the gateway knows its length (it holds again once it does).
DEFAULT_SEGMENT_SECONDS = 30
# The transcription model a transcription session uses until it says otherwise.
DEFAULT_TRANSCRIPTION_MODEL = "gpt-4o-transcribe"
# Bytes of input audio a second, by format: 24 kHz 16-bit PCM, or 8 kHz G.711.
PCM16_BYTES_PER_SECOND = 48_000
G711_BYTES_PER_SECOND = 8_000


class SessionKind(StrEnum):
    """A conversation (`?model=`) or a transcription session (`?intent=transcription`)."""

    CONVERSATION = "realtime"
    TRANSCRIPTION = "transcription"


def event_type(text: str) -> str | None:
    """The `type` of a JSON event when it is the first member, as OpenAI and the SDK write it.

    Reads only the event's first bytes (a relayed audio chunk is not parsed);
    None when the type is not first or not plain, and the caller parses the
    whole event instead.
    """
    for lead in ('{"type":"', '{"type": "'):
        if text.startswith(lead):
            start = len(lead)
            end = text.find('"', start, start + 80)
            if end > start and "\\" not in text[start:end]:
                return text[start:end]
    return None


def _count(data: Any, *path: str) -> int:
    for key in path:
        if not isinstance(data, Mapping):
            return 0
        data = data.get(key)
    if isinstance(data, bool) or not isinstance(data, int) or data < 0:
        return 0
    return data


def response_usage(model: str, response: Any) -> Usage | None:
    """The usage of a `response.done` event's `response`, None when it reports none.

    Audio, image and cached tokens are parts of the input and output totals,
    as in the event; cached audio input is part of both the cached and the
    audio input. Images are priced at the image input rate, cached ones at
    the cached input rate (the price list has no cached image rate).
    """
    if not isinstance(response, Mapping) or not isinstance(response.get("usage"), Mapping):
        return None
    usage = response["usage"]
    input_tokens = _count(usage, "input_tokens")
    output_tokens = _count(usage, "output_tokens")
    images = _count(usage, "input_token_details", "image_tokens")
    cached_images = _count(usage, "input_token_details", "cached_tokens_details", "image_tokens")
    return Usage(
        Operation.REALTIME,
        model,
        input_tokens=input_tokens,
        cached_input_tokens=_count(usage, "input_token_details", "cached_tokens"),
        output_tokens=output_tokens,
        audio_input_tokens=_count(usage, "input_token_details", "audio_tokens"),
        cached_audio_input_tokens=_count(
            usage, "input_token_details", "cached_tokens_details", "audio_tokens"
        ),
        audio_output_tokens=_count(usage, "output_token_details", "audio_tokens"),
        image_input_tokens=max(0, images - cached_images),
    )


def transcription_usage(model: str, usage: Any) -> Usage | None:
    """The usage of a transcription-completed event: tokens, or seconds (whisper-1)."""
    if not isinstance(usage, Mapping):
        return None
    op = Operation.REALTIME_TRANSCRIPTION
    if usage.get("type") == "duration":
        seconds = usage.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float | str):
            return None
        try:
            value = Decimal(str(seconds))
        except InvalidOperation:
            return None
        if not value.is_finite() or value < 0:
            return None
        return Usage(op, model, audio_seconds=value)
    if usage.get("type") != "tokens":
        return None
    input_tokens = _count(usage, "input_tokens")
    details = usage.get("input_token_details")
    # Without a breakdown every input token is taken as audio (the dearer kind).
    audio = _count(details, "audio_tokens") if isinstance(details, Mapping) else input_tokens
    return Usage(
        op,
        model,
        input_tokens=input_tokens,
        output_tokens=_count(usage, "output_tokens"),
        audio_input_tokens=min(audio, input_tokens),
    )


def audio_bytes_per_second(audio_format: Any) -> int:
    """Input audio bytes a second of a session's format (GA object or beta string)."""
    kind = audio_format.get("type") if isinstance(audio_format, Mapping) else audio_format
    if kind in ("audio/pcmu", "audio/pcma", "g711_ulaw", "g711_alaw"):
        return G711_BYTES_PER_SECOND
    return PCM16_BYTES_PER_SECOND


@dataclass
class SessionMeter:
    """What the next response or transcription of one session may use (for its hold).

    A response reads the whole conversation: its input is at least what the
    previous response read and wrote, plus what was added since (text items,
    committed audio), all held as uncached (an upper bound); its output is
    the response's `max_output_tokens`, held as audio when the session
    answers in audio.
    """

    kind: SessionKind
    model: str
    transcription_model: str | None = None
    max_output_tokens: int = 4096
    audio_output: bool = True
    bytes_per_second: int = PCM16_BYTES_PER_SECOND
    context_tokens: int = 0
    context_audio_tokens: int = 0
    new_text_chars: int = 0
    new_audio_bytes: int = 0  # committed since the last response.done
    buffer_bytes: int = 0  # appended, not yet committed

    def appended(self, base64_chars: int) -> None:
        """Audio appended to the input buffer: `base64_chars` of base64 (an upper bound)."""
        self.buffer_bytes += base64_chars * 3 // 4

    def buffered_seconds(self) -> Decimal:
        """Seconds of audio in the input buffer (appended, not yet committed)."""
        return Decimal(self.buffer_bytes) / Decimal(self.bytes_per_second)

    def committed(self) -> Decimal:
        """The input buffer was committed: its audio joins the conversation. Returns its seconds."""
        seconds = self.buffered_seconds()
        self.new_audio_bytes += self.buffer_bytes
        self.buffer_bytes = 0
        return seconds

    def cleared(self) -> None:
        self.buffer_bytes = 0

    def added_text(self, chars: int) -> None:
        """A conversation item or instructions of `chars` characters were added."""
        self.new_text_chars += chars

    def answered(self, usage: Usage) -> None:
        """A response is done: the next reads what this one read and wrote."""
        self.context_tokens = usage.input_tokens + usage.output_tokens
        self.context_audio_tokens = usage.audio_input_tokens + usage.audio_output_tokens
        self.new_text_chars = 0
        self.new_audio_bytes = 0

    def _audio_tokens(self, audio_bytes: int) -> int:
        return math.ceil(audio_bytes * INPUT_AUDIO_TOKENS_PER_SECOND / self.bytes_per_second)

    def response_estimate(self, max_output_tokens: int | None = None) -> Usage:
        """The usage to hold for the next response (estimated=True)."""
        # Audio still in the buffer counts: voice detection may commit it into this response.
        new_audio = self._audio_tokens(self.new_audio_bytes + self.buffer_bytes)
        new_text = math.ceil(self.new_text_chars / CHARS_PER_TOKEN)
        output = self.max_output_tokens if max_output_tokens is None else max_output_tokens
        return Usage(
            Operation.REALTIME,
            self.model,
            input_tokens=self.context_tokens + new_audio + new_text + REQUEST_OVERHEAD_TOKENS,
            output_tokens=output,
            audio_input_tokens=self.context_audio_tokens + new_audio,
            audio_output_tokens=output if self.audio_output else 0,
            estimated=True,
        )

    def transcription_estimate(self, seconds: Decimal | None = None) -> Usage:
        """The usage to hold for the transcription of `seconds` of audio (default 30 s)."""
        if seconds is None:
            seconds = Decimal(DEFAULT_SEGMENT_SECONDS)
        audio = math.ceil(seconds * INPUT_AUDIO_TOKENS_PER_SECOND) + 1
        return Usage(
            Operation.REALTIME_TRANSCRIPTION,
            self.transcription_model or DEFAULT_TRANSCRIPTION_MODEL,
            input_tokens=audio + REQUEST_OVERHEAD_TOKENS,
            output_tokens=math.ceil(seconds * TRANSCRIPT_TOKENS_PER_SECOND) + 1,
            audio_input_tokens=audio,
            audio_seconds=seconds,
            estimated=True,
        )

    def configure(self, session: Any) -> None:
        """Take the settings that size estimates from a session object (GA or beta shape).

        Called with what the upstream reports (`session.created`/`updated`),
        which is the session as it really is, defaults included.
        """
        if not isinstance(session, Mapping):
            return
        if session.get("type") == "transcription":
            self.kind = SessionKind.TRANSCRIPTION
        model = session.get("model")
        if isinstance(model, str) and model and self.kind is SessionKind.CONVERSATION:
            self.model = model
        limit = session.get("max_output_tokens", session.get("max_response_output_tokens"))
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            self.max_output_tokens = limit
        modalities = session.get("output_modalities", session.get("modalities"))
        if isinstance(modalities, list):
            self.audio_output = "audio" in modalities
        transcription = transcription_model_of(session)
        if transcription is not None:
            self.transcription_model = transcription
        audio = session.get("audio")
        audio_input = audio.get("input") if isinstance(audio, Mapping) else None
        fmt = audio_input.get("format") if isinstance(audio_input, Mapping) else None
        if fmt is None:
            fmt = session.get("input_audio_format")
        if fmt is not None:
            self.bytes_per_second = audio_bytes_per_second(fmt)


def transcription_model_of(session: Any) -> str | None:
    """The input transcription model a session object names, if any (GA or beta shape)."""
    if not isinstance(session, Mapping):
        return None
    audio = session.get("audio")
    audio_input = audio.get("input") if isinstance(audio, Mapping) else None
    transcription = audio_input.get("transcription") if isinstance(audio_input, Mapping) else None
    if transcription is None:
        transcription = session.get("input_audio_transcription")
    model = transcription.get("model") if isinstance(transcription, Mapping) else None
    return model if isinstance(model, str) and model else None
