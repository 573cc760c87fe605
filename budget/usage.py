"""What a request asks for and what it used, read from OpenAI payloads.

`parse_request` reads a client's request body (and adds
`stream_options.include_usage` to streamed chat requests so usage can be
metered), `usage_from_response` reads a whole response, and the stream taps
read usage from a server-sent-event stream while passing its bytes on.

Nothing here does I/O: it parses the bytes it is handed.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from types import MappingProxyType
from typing import Any, TypedDict

import mutagen
from python_multipart.multipart import MultipartParser, parse_options_header

# About four characters of English or German text make one token.
CHARS_PER_TOKEN = 4
# Tokens every request costs beyond its text (role markers, message framing).
REQUEST_OVERHEAD_TOKENS = 8
# Audio length assumed when the uploaded file's duration cannot be read.
# A hold only reserves: the charge comes from the duration upstream reports.
# Ten minutes covers a typical dictation without a wrong, huge guess (a 25 MB
# upload can hold hours of low-bitrate audio) blocking a nearly empty budget.
UNKNOWN_AUDIO_SECONDS = Decimal(600)


class Operation(StrEnum):
    """The kind of upstream call, which decides how it is priced."""

    CHAT = "chat"
    COMPLETION = "completion"
    RESPONSES = "responses"
    EMBEDDING = "embedding"
    TRANSCRIPTION = "transcription"
    TRANSLATION = "translation"
    SPEECH = "speech"
    IMAGE = "image"
    MODERATION = "moderation"


OPERATION_BY_PATH: Mapping[str, Operation] = MappingProxyType(
    {
        "/v1/chat/completions": Operation.CHAT,
        "/v1/completions": Operation.COMPLETION,
        "/v1/responses": Operation.RESPONSES,
        "/v1/embeddings": Operation.EMBEDDING,
        "/v1/audio/transcriptions": Operation.TRANSCRIPTION,
        "/v1/audio/translations": Operation.TRANSLATION,
        "/v1/audio/speech": Operation.SPEECH,
        "/v1/images/generations": Operation.IMAGE,
        "/v1/moderations": Operation.MODERATION,
    }
)

_AUDIO_UPLOADS = frozenset({Operation.TRANSCRIPTION, Operation.TRANSLATION})
_USAGE_INJECTED = frozenset({Operation.CHAT, Operation.COMPLETION})


@dataclass(frozen=True, slots=True)
class Usage:
    """What one request used: tokens, audio seconds, speech characters or images.

    `estimated` is True when the figures were not read from the upstream's own
    usage report (a hold, or a stream that ended without usage).
    """

    operation: Operation
    model: str
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    audio_seconds: Decimal = Decimal(0)
    characters: int = 0
    images: int = 0
    image_size: str | None = None
    image_quality: str | None = None
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens (reasoning and cached tokens are inside them)."""
        return self.input_tokens + self.output_tokens

    @property
    def has_tokens(self) -> bool:
        """True when any token count is above zero."""
        return self.input_tokens > 0 or self.output_tokens > 0


class InvalidRequest(Exception):
    """A client request the gateway cannot meter (bad JSON, missing model, wrong types)."""

    def __init__(
        self, message: str, param: str | None = None, code: str = "invalid_request"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a request asks for, read from its body before it is forwarded.

    input_chars: characters of text the model reads (4 per token of a token array);
    characters: speech input length; images: images asked for; audio_seconds: the
    uploaded file's duration in seconds (None when unreadable); choices: chat and
    completion `n` (output is produced that many times).
    """

    operation: Operation
    model: str
    stream: bool = False
    client_wants_usage: bool = False
    max_output_tokens: int | None = None
    input_chars: int = 0
    characters: int = 0
    images: int = 0
    image_size: str | None = None
    image_quality: str | None = None
    audio_seconds: Decimal | None = None
    choices: int = 1


def input_tokens_estimate(input_chars: int) -> int:
    """Estimated input tokens of `input_chars` characters: ceil(chars / 4) + 8 overhead."""
    return math.ceil(max(0, input_chars) / CHARS_PER_TOKEN) + REQUEST_OVERHEAD_TOKENS


# -- requests ----------------------------------------------------------------


# The model OpenAI uses for a moderation request that names none.
DEFAULT_MODERATION_MODEL = "omni-moderation-latest"


def parse_request(
    operation: Operation, content_type: str, body: bytes
) -> tuple[RequestInfo, bytes]:
    """Read a request body; return what it asks for and the body to forward upstream.

    The body is returned unchanged (the same object), except for a streamed chat
    or completion request, where `stream_options.include_usage` is set to true
    so the stream reports usage; only then is the JSON re-serialised compactly.
    """
    if operation in _AUDIO_UPLOADS:
        return _parse_audio_upload(operation, content_type, body), body
    data = _json_object(body)
    model = data.get("model")
    if model is None and operation is Operation.MODERATION:
        model = DEFAULT_MODERATION_MODEL  # OpenAI lets moderations omit the model
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter", param="model")
    stream = _optional_bool(data, "stream") or False
    stream_options = data.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise InvalidRequest("stream_options must be an object", param="stream_options")
    client_wants_usage = bool(stream_options and stream_options.get("include_usage") is True)

    max_output_tokens: int | None = None
    choices = 1
    input_chars = 0
    characters = 0
    images = 0
    image_size: str | None = None
    image_quality: str | None = None
    if operation is Operation.CHAT:
        max_output_tokens = _optional_count(data, "max_completion_tokens")
        if max_output_tokens is None:
            max_output_tokens = _optional_count(data, "max_tokens")
        choices = _optional_count(data, "n", minimum=1) or 1
        input_chars = _text_chars(data.get("messages"))
    elif operation is Operation.COMPLETION:
        max_output_tokens = _optional_count(data, "max_tokens")
        choices = _optional_count(data, "n", minimum=1) or 1
        input_chars = _text_chars(data.get("prompt"))
    elif operation is Operation.RESPONSES:
        max_output_tokens = _optional_count(data, "max_output_tokens")
        input_chars = _text_chars(data.get("input")) + _text_chars(data.get("instructions"))
    elif operation in (Operation.EMBEDDING, Operation.MODERATION):
        input_chars = _text_chars(data.get("input"))
    elif operation is Operation.SPEECH:
        text = data.get("input")
        characters = len(text) if isinstance(text, str) else 0
        input_chars = characters + _text_chars(data.get("instructions"))
    elif operation is Operation.IMAGE:
        images = _optional_count(data, "n", minimum=1) or 1
        input_chars = _text_chars(data.get("prompt"))
        image_size = _optional_str(data, "size") or "1024x1024"
        image_quality = _optional_str(data, "quality") or "standard"

    info = RequestInfo(
        operation=operation,
        model=model,
        stream=stream,
        client_wants_usage=client_wants_usage,
        max_output_tokens=max_output_tokens,
        input_chars=input_chars,
        characters=characters,
        images=images,
        image_size=image_size,
        image_quality=image_quality,
        choices=choices,
    )
    if operation in _USAGE_INJECTED and stream and not client_wants_usage:
        data["stream_options"] = {**(stream_options or {}), "include_usage": True}
        body = _compact_json(data)
    return info, body


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise InvalidRequest("Invalid JSON body", code="invalid_json")
    return data


# Made once: json.dumps with options builds a new encoder on every call.
_COMPACT_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _compact_json(data: Mapping[str, Any]) -> bytes:
    try:
        return _COMPACT_ENCODER.encode(data).encode()
    except UnicodeEncodeError:
        # A lone surrogate ("\ud800") read from the client's escapes cannot be
        # UTF-8 encoded; escape it back the way the client sent it.
        return _ASCII_ENCODER.encode(data).encode()


def _optional_bool(data: Mapping[str, Any], key: str) -> bool | None:
    value = data.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise InvalidRequest(f"{key} must be a boolean", param=key)


def _optional_count(data: Mapping[str, Any], key: str, *, minimum: int = 0) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(f"{key} must be an integer of at least {minimum}", param=key)
    return value


def _optional_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string", param=key)
    return value


# Keys under which a message, content part or Responses input item carries text.
_TEXT_KEYS = ("content", "text", "output", "arguments")


def _text_chars(value: Any) -> int:
    """Characters of text in a prompt/input/messages value; a token id counts as 4."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return CHARS_PER_TOKEN
    if isinstance(value, list):
        return sum(_text_chars(item) for item in value)
    if isinstance(value, dict):
        return sum(_text_chars(value[key]) for key in _TEXT_KEYS if key in value)
    return 0


def _parse_audio_upload(operation: Operation, content_type: str, body: bytes) -> RequestInfo:
    fields, file_data = _multipart_fields(content_type, body)
    model = fields.get("model")
    if not model:
        raise InvalidRequest("you must provide a model parameter", param="model")
    stream_text = fields.get("stream", "false").strip().lower()
    if stream_text not in ("true", "false"):
        raise InvalidRequest("stream must be a boolean", param="stream")
    return RequestInfo(
        operation=operation,
        model=model,
        stream=stream_text == "true",
        input_chars=len(fields.get("prompt", "")),
        audio_seconds=None if file_data is None else audio_duration_seconds(file_data),
    )


def _multipart_fields(content_type: str, body: bytes) -> tuple[dict[str, str], bytes | None]:
    """Text fields of a multipart/form-data body, and the bytes of its `file` part."""
    mime, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if mime != b"multipart/form-data" or not boundary:
        raise InvalidRequest(
            "Expected a multipart/form-data body with a boundary", code="invalid_multipart"
        )
    parts: list[tuple[dict[bytes, bytes], bytearray]] = []
    header_field = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        parts.append(({}, bytearray()))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1][0][bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1][1].extend(data[start:end])

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except ValueError as exc:  # python_multipart's parse errors derive from ValueError
        raise InvalidRequest(f"Invalid multipart body: {exc}", code="invalid_multipart") from exc

    fields: dict[str, str] = {}
    file_data: bytes | None = None
    for headers, data in parts:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        if name == "file":
            file_data = bytes(data)
        elif name and b"filename" not in disposition:
            fields[name] = data.decode("utf-8", "replace")
    return fields, file_data


def audio_duration_seconds(data: bytes) -> Decimal | None:
    """Duration in seconds of audio file bytes (mp3, m4a, ogg, flac, wav); None if unreadable."""
    try:
        audio = mutagen.File(io.BytesIO(data))
        length = audio.info.length if audio is not None else None
    except Exception:  # mutagen raises many kinds of errors on damaged files
        return None
    if not isinstance(length, int | float) or not math.isfinite(length) or length <= 0:
        return None
    # str() keeps the float's shortest decimal form (0.1 stays 0.1).
    return Decimal(str(length))


# -- responses ---------------------------------------------------------------


def usage_from_response(info: RequestInfo, body: bytes) -> Usage | None:
    """Usage of a whole (non-streamed) response body; None when it reports none.

    Token counts are whole tokens, audio in seconds. The model recorded is the
    response's own `model` when it names one.
    """
    op = info.operation
    if op is Operation.SPEECH:
        return Usage(op, info.model, characters=info.characters)
    data = _exact_json(body)
    model = info.model
    if data is not None and isinstance(data.get("model"), str) and data["model"]:
        model = data["model"]
    if op is Operation.MODERATION:
        return Usage(op, model)
    if op in _AUDIO_UPLOADS:
        return _audio_usage(info, model, data)
    if data is None:
        return None
    usage = data.get("usage")
    if op is Operation.IMAGE:
        items = data.get("data")
        image_usage = Usage(
            op,
            model,
            images=len(items) if isinstance(items, list) else info.images,
            image_size=info.image_size,
            image_quality=info.image_quality,
        )
        if isinstance(usage, dict):  # gpt-image-1 also reports tokens
            return replace(image_usage, **_usage_tokens(op, usage))
        return image_usage
    if not isinstance(usage, dict):
        return None
    return Usage(op, model, **_usage_tokens(op, usage))


# Decimal for fractions: durations stay exact. One decoder for all: json.loads
# with parse_float builds a new decoder and scanner on every call, which cost
# more than decoding a chat completion (~9 % of a request's CPU in-process).
_EXACT_DECODER = json.JSONDecoder(parse_float=Decimal)


def _exact_json(text: bytes) -> dict[str, Any] | None:
    """A JSON object with exact fractions, or None (not JSON, or not an object)."""
    try:
        # As json.loads does with bytes: UTF-8/16/32 detected, lone surrogates kept.
        data = _EXACT_DECODER.decode(text.decode(json.detect_encoding(text), "surrogatepass"))
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _count(data: Any, *path: str) -> int:
    for key in path:
        if not isinstance(data, dict):
            return 0
        data = data.get(key)
    if isinstance(data, bool) or not isinstance(data, int) or data < 0:
        return 0
    return data


class _TokenCounts(TypedDict):
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int


def _usage_tokens(op: Operation, usage: Mapping[str, Any]) -> _TokenCounts:
    """Token counts of an OpenAI `usage` object as Usage keyword arguments."""
    if "prompt_tokens" in usage:  # chat, completions, embeddings
        return {
            "input_tokens": _count(usage, "prompt_tokens"),
            "cached_input_tokens": _count(usage, "prompt_tokens_details", "cached_tokens"),
            "output_tokens": _count(usage, "completion_tokens"),
            "reasoning_tokens": _count(usage, "completion_tokens_details", "reasoning_tokens"),
        }
    # Responses, images and audio: input_tokens / output_tokens.
    details = "input_token_details" if op in _AUDIO_UPLOADS else "input_tokens_details"
    return {
        "input_tokens": _count(usage, "input_tokens"),
        "cached_input_tokens": _count(usage, details, "cached_tokens"),
        "output_tokens": _count(usage, "output_tokens"),
        "reasoning_tokens": _count(usage, "output_tokens_details", "reasoning_tokens"),
    }


def _seconds(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        return None
    try:
        seconds = Decimal(value)
    except InvalidOperation:
        return None
    return seconds if seconds.is_finite() and seconds >= 0 else None


def _audio_usage(info: RequestInfo, model: str, data: dict[str, Any] | None) -> Usage | None:
    """Transcription/translation usage: upstream's usage, else the file's duration."""
    op = info.operation
    usage = data.get("usage") if data is not None else None
    # verbose_json answers carry the duration; text/srt/vtt ones are not JSON.
    seconds = _seconds(data.get("duration")) if data is not None else None
    if seconds is None:
        seconds = info.audio_seconds
    if isinstance(usage, dict) and usage.get("type") == "duration":
        reported = _seconds(usage.get("seconds"))
        if reported is not None:
            return Usage(op, model, audio_seconds=reported)
    if isinstance(usage, dict) and usage.get("type") == "tokens":
        return Usage(op, model, audio_seconds=seconds or Decimal(0), **_usage_tokens(op, usage))
    if seconds is None:
        return None
    return Usage(op, model, audio_seconds=seconds)


# -- streams -----------------------------------------------------------------

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
    return _exact_json(_event_data(event))


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
        audio = info.audio_seconds
        if info.operation in _AUDIO_UPLOADS and audio is None:
            audio = UNKNOWN_AUDIO_SECONDS
        return Usage(
            info.operation,
            info.model,
            input_tokens=input_tokens_estimate(info.input_chars),
            output_tokens=self._content_events,
            audio_seconds=audio or Decimal(0),
            characters=info.characters,
            images=info.images,
            image_size=info.image_size,
            image_quality=info.image_quality,
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
        self._usage = Usage(
            self.info.operation,
            model if isinstance(model, str) and model else self.info.model,
            **_usage_tokens(self.info.operation, usage),
        )
        choices = data.get("choices")
        if choices:
            self._content_events += 1
            return True  # usage riding on a content chunk stays
        return self.info.client_wants_usage


@dataclass(frozen=True, slots=True)
class _EventKinds:
    final: re.Pattern[bytes]  # the event that carries usage
    content: re.Pattern[bytes]  # an event of produced output
    usage_under: str | None  # key of the object holding "usage" ("response"), None: top level


def _type_pattern(*types: str) -> re.Pattern[bytes]:
    alternatives = b"|".join(re.escape(t.encode()) for t in types)
    return re.compile(rb'"type"\s*:\s*"(?:' + alternatives + rb')"')


_RESPONSES_EVENTS = _EventKinds(
    final=_type_pattern("response.completed", "response.incomplete", "response.failed"),
    content=_type_pattern("response.output_text.delta"),
    usage_under="response",
)
_TRANSCRIPT_EVENTS = _EventKinds(
    final=_type_pattern("transcript.text.done"),
    content=_type_pattern("transcript.text.delta"),
    usage_under=None,
)


class TypedEventStreamTap(StreamTap):
    """Streams of typed events (Responses API, audio transcripts): bytes pass untouched.

    Only the final event (`response.completed` / `.incomplete` / `.failed`, or
    `transcript.text.done`) is JSON-parsed for usage.
    """

    def __init__(self, info: RequestInfo, kinds: _EventKinds) -> None:
        super().__init__(info)
        self._kinds = kinds

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
        self.completed = True
        holder = data.get(kinds.usage_under) if kinds.usage_under else data
        if not isinstance(holder, dict):
            return True
        usage = holder.get("usage")
        if not isinstance(usage, dict):
            return True
        model = holder.get("model")
        self._usage = Usage(
            self.info.operation,
            model if isinstance(model, str) and model else self.info.model,
            audio_seconds=self.info.audio_seconds or Decimal(0),
            **_usage_tokens(self.info.operation, usage),
        )
        return True


class _RequestUsageStreamTap(StreamTap):
    """Streams whose usage the request tells (speech characters): bytes pass untouched."""

    def usage(self) -> Usage | None:
        return Usage(self.info.operation, self.info.model, characters=self.info.characters)


def stream_tap_for(info: RequestInfo) -> StreamTap:
    """The stream tap that reads usage from this request's event stream."""
    if info.operation in _USAGE_INJECTED:
        return ChatStreamTap(info)
    if info.operation is Operation.RESPONSES:
        return TypedEventStreamTap(info, _RESPONSES_EVENTS)
    if info.operation in _AUDIO_UPLOADS:
        return TypedEventStreamTap(info, _TRANSCRIPT_EVENTS)
    if info.operation is Operation.SPEECH:
        return _RequestUsageStreamTap(info)
    return StreamTap(info)
