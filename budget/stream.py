"""Stream taps: read usage from an upstream server-sent-event stream while passing it on."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from budget.audio import billed_seconds
from budget.estimate import UNKNOWN_AUDIO_SECONDS, input_tokens_estimate
from budget.operations import AUDIO_UPLOADS, IMAGE_OPERATIONS, USAGE_INJECTED, Operation
from budget.request import RequestInfo
from budget.response import exact_json, usage_of_object, usage_tokens
from budget.usage import Usage

# The blank line that ends a server-sent event, with either line ending.
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_DONE = re.compile(rb"^data: ?\[DONE\]\s*$", re.MULTILINE)


def _event_data(event: bytes) -> bytes:
    """The `data:` lines of one server-sent event, joined by newlines."""
    lines = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            lines.append(line[6:] if line[5:6] == b" " else line[5:])
    return b"\n".join(lines)


def _event_json(event: bytes) -> dict[str, Any] | None:
    return exact_json(_event_data(event))


class StreamTap:
    """Reads usage from an upstream event stream while passing its bytes on.

    feed() returns the bytes to forward now and close() what was held back.
    Only events that can carry usage are JSON-parsed. When a stream ends
    without usage, estimated_usage() charges what was produced: OpenAI streams
    about one token per content event, so output tokens = content events seen.

    This base class forwards everything untouched and reads no usage; it
    serves operations whose usage the request already tells (speech).
    """

    def __init__(self, info: RequestInfo) -> None:
        self.info = info
        self.completed = False
        self._usage: Usage | None = None
        self._content_events = 0
        # The event being received; complete events are handled at once.
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        """Take the next bytes from upstream; return the bytes to forward to the client now."""
        out = bytearray() if self._holds_back else None
        pending = self._pending
        search_from = max(0, len(pending) - 3)  # a blank line may straddle chunks
        pending.extend(chunk)
        start = 0
        while (end := _EVENT_END.search(pending, max(start, search_from))) is not None:
            event = bytes(pending[start : end.end()])
            keep = self._on_event(event)
            if out is not None and keep:
                out.extend(event)
            start = end.end()
        del pending[:start]
        if out is None:
            return chunk
        return bytes(out)

    def close(self) -> bytes:
        """Upstream ended: handle an unterminated last event; return the bytes still held back."""
        event = bytes(self._pending)
        self._pending.clear()
        if not event.strip():
            return event if self._holds_back else b""
        keep = self._on_event(event)
        return event if self._holds_back and keep else b""

    def usage(self) -> Usage | None:
        """The usage upstream reported in the stream, once seen; else None."""
        return self._usage

    def estimated_usage(self) -> Usage:
        """Usage of a stream cut short or ending without usage (estimated=True).

        Input tokens are the request's estimate (ceil(chars / 4) + 8); output
        tokens are the number of content events seen, as OpenAI streams about
        one token per content event.
        """
        info = self.info
        if info.operation in AUDIO_UPLOADS:
            # Billed by time when no token usage came: never at text-token rates.
            audio = info.audio_seconds
            seconds = (
                UNKNOWN_AUDIO_SECONDS if audio is None else billed_seconds(audio, measured=True)
            )
            return Usage(info.operation, info.model, audio_seconds=seconds, estimated=True)
        if info.operation is Operation.SPEECH:
            return Usage(info.operation, info.model, characters=info.characters, estimated=True)
        return Usage(
            info.operation,
            info.model,
            input_tokens=input_tokens_estimate(info.input_chars),
            output_tokens=self._content_events,
            characters=info.characters,
            images=info.images,
            image_size=info.image_size,
            image_quality=info.image_quality,
            service_tier=info.service_tier,
            estimated=True,
        )

    @property
    def _holds_back(self) -> bool:
        """True when events may be removed, so a partial event waits for its end."""
        return False

    def _on_event(self, event: bytes) -> bool:
        """Handle one whole event; return False to remove it from the stream."""
        return True


class ChatStreamTap(StreamTap):
    """Chat and completion streams: usage from the usage chunk, removed unless asked for.

    Only an event whose bytes contain `"usage": {` is JSON-parsed. When the
    client did not ask for usage (`stream_options.include_usage`), the
    usage-only chunk (empty `choices`) the gateway asked for is removed; a
    partial event is then held until its end arrives, a whole one never. When
    the client asked for usage, bytes pass through untouched in the same call.
    """

    @property
    def _holds_back(self) -> bool:
        return not self.info.client_wants_usage

    def _on_event(self, event: bytes) -> bool:
        if _DONE.search(event):
            self.completed = True
            return True
        if not _USAGE_OBJECT.search(event):
            if b"data:" in event:
                self._content_events += 1
            return True
        data = _event_json(event)
        usage = data.get("usage") if data is not None else None
        if data is None or not isinstance(usage, dict):
            # "usage": { inside a content string: an ordinary content event.
            self._content_events += 1
            return True
        model = data.get("model")
        tier = data.get("service_tier")
        self._usage = Usage(
            self.info.operation,
            model if isinstance(model, str) and model else self.info.model,
            service_tier=tier if isinstance(tier, str) and tier else None,
            **usage_tokens(self.info.operation, usage),
        )
        choices = data.get("choices")
        if choices:
            self._content_events += 1
            return True  # usage riding on a content chunk stays
        return self.info.client_wants_usage


def _model_of(holder: Mapping[str, Any], info: RequestInfo) -> str:
    model = holder.get("model")
    return model if isinstance(model, str) and model else info.model


def _responses_usage(info: RequestInfo, data: Mapping[str, Any]) -> Usage | None:
    response = data.get("response")
    if not isinstance(response, dict):
        return None
    return usage_of_object(info, _model_of(response, info), response)


def _top_level_usage(info: RequestInfo, data: Mapping[str, Any]) -> Usage | None:
    """Usage at the top of the event (transcript.text.done, speech.audio.done)."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    return Usage(info.operation, _model_of(data, info), **usage_tokens(info.operation, usage))


def _image_usage(info: RequestInfo, data: Mapping[str, Any]) -> Usage | None:
    """One finished image of a streamed image request, with its token usage."""
    usage = data.get("usage")
    size, quality = data.get("size"), data.get("quality")
    image = Usage(
        info.operation,
        info.model,
        images=1,
        image_size=size if isinstance(size, str) else info.image_size,
        image_quality=quality if isinstance(quality, str) else info.image_quality,
    )
    if not isinstance(usage, dict):
        return image
    return replace(image, **usage_tokens(info.operation, usage))


def _added(total: Usage | None, more: Usage) -> Usage:
    """Two images' usage as one."""
    if total is None:
        return more
    return replace(
        total,
        images=total.images + more.images,
        input_tokens=total.input_tokens + more.input_tokens,
        cached_input_tokens=total.cached_input_tokens + more.cached_input_tokens,
        output_tokens=total.output_tokens + more.output_tokens,
        image_input_tokens=total.image_input_tokens + more.image_input_tokens,
        image_output_tokens=total.image_output_tokens + more.image_output_tokens,
    )


@dataclass(frozen=True, slots=True)
class _EventKinds:
    final: re.Pattern[bytes]  # an event that carries usage
    content: re.Pattern[bytes]  # an event of produced output
    read: Callable[[RequestInfo, Mapping[str, Any]], Usage | None]
    # True: every final event is one more item (images), its usage added up;
    # False: the first final event ends the stream's metering.
    each_adds: bool = False


def _type_pattern(*types: str) -> re.Pattern[bytes]:
    alternatives = b"|".join(re.escape(t.encode()) for t in types)
    return re.compile(rb'"type"\s*:\s*"(?:' + alternatives + rb')"')


_RESPONSES_EVENTS = _EventKinds(
    final=_type_pattern("response.completed", "response.incomplete", "response.failed"),
    content=_type_pattern("response.output_text.delta"),
    read=_responses_usage,
)
_TRANSCRIPT_EVENTS = _EventKinds(
    final=_type_pattern("transcript.text.done"),
    content=_type_pattern("transcript.text.delta"),
    read=_top_level_usage,
)
_SPEECH_EVENTS = _EventKinds(
    final=_type_pattern("speech.audio.done"),
    content=_type_pattern("speech.audio.delta"),
    read=_top_level_usage,
)
_IMAGE_EVENTS = _EventKinds(
    final=_type_pattern("image_generation.completed", "image_edit.completed"),
    content=_type_pattern("image_generation.partial_image", "image_edit.partial_image"),
    read=_image_usage,
    each_adds=True,
)


class TypedEventStreamTap(StreamTap):
    """Streams of typed events (Responses, transcripts, speech, images): bytes pass untouched.

    Only a final event (`response.completed` / `.incomplete` / `.failed`,
    `transcript.text.done`, `speech.audio.done`, `image_generation.completed`)
    is JSON-parsed for usage.
    """

    def __init__(self, info: RequestInfo, kinds: _EventKinds) -> None:
        super().__init__(info)
        self._kinds = kinds
        # The id of the object a final event names (a Responses response).
        self.object_id: str | None = None

    def _on_event(self, event: bytes) -> bool:
        kinds = self._kinds
        if kinds.content.search(event):
            self._content_events += 1
            return True
        if not kinds.final.search(event):
            return True
        data = _event_json(event)
        if data is None:
            return True
        usage = kinds.read(self.info, data)
        response = data.get("response")
        if isinstance(response, dict) and isinstance(response.get("id"), str):
            self.object_id = response["id"]
        if kinds.each_adds:
            if usage is not None:
                self._usage = _added(self._usage, usage)
            self.completed = True
            return True
        self.completed = True
        if usage is not None and self._usage is None:
            self._usage = usage
        return True


def stream_tap_for(info: RequestInfo) -> StreamTap:
    """The stream tap that reads usage from this request's event stream."""
    if info.operation in USAGE_INJECTED:
        return ChatStreamTap(info)
    if info.operation is Operation.RESPONSES:
        return TypedEventStreamTap(info, _RESPONSES_EVENTS)
    if info.operation in AUDIO_UPLOADS:
        return TypedEventStreamTap(info, _TRANSCRIPT_EVENTS)
    if info.operation is Operation.SPEECH:
        return TypedEventStreamTap(info, _SPEECH_EVENTS)
    if info.operation in IMAGE_OPERATIONS:
        return TypedEventStreamTap(info, _IMAGE_EVENTS)
    return StreamTap(info)
