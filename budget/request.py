"""What a client's request asks for, read from its body before it is forwarded.

`parse_request` reads a JSON or multipart body into a `RequestInfo` and adds
`stream_options.include_usage` to streamed chat requests so usage can be
metered. Nothing here does I/O: it parses the bytes it is handed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

from budget.audio import audio_duration_seconds
from budget.operations import (
    AUDIO_UPLOADS,
    IMAGE_UPLOADS,
    STORE_DEFAULTED,
    USAGE_INJECTED,
    Operation,
)
from budget.output_limit import OUTPUT_LIMIT_FIELD

# About four characters of English or German text make one token.
CHARS_PER_TOKEN = 4
# Transcription/translation answers that are plain text and carry no usage:
# billed from the upload's own length, so that length must be readable.
UNMETERED_AUDIO_FORMATS = frozenset({"text", "srt", "vtt"})


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
    # The client's own `store` (None: not set; the body forwarded says false).
    store: bool | None = None
    # Responses `background: true`: answered at once, run and billed later.
    background: bool = False
    response_format: str | None = None
    service_tier: str | None = None
    web_search_preview: bool = False


# The model OpenAI uses for a moderation request that names none.
DEFAULT_MODERATION_MODEL = "omni-moderation-latest"


def parse_request(
    operation: Operation, content_type: str, body: bytes
) -> tuple[RequestInfo, bytes]:
    """Read a request body; return what it asks for and the body to forward upstream.

    The body is returned unchanged (the same object), except that a chat or
    Responses request without `store` (and not `background`) gets `"store": false` (zero retention:
    OpenAI keeps Responses by default), and a streamed chat or completion
    request gets `stream_options.include_usage` set to true so the stream
    reports usage. Only the latter re-serialises the JSON (compactly, in the
    same pass as `store`); `store` alone is spliced in after the opening brace.
    """
    if operation in AUDIO_UPLOADS:
        return _parse_audio_upload(operation, content_type, body), body
    if operation in IMAGE_UPLOADS:
        return _parse_image_upload(operation, content_type, body), body
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
    store = _optional_bool(data, "store")
    service_tier = _optional_str(data, "service_tier")

    max_output_tokens: int | None = None
    web_search_preview = False
    background = False
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
        input_chars = _text_chars(_messages(data))
    elif operation is Operation.COMPLETION:
        max_output_tokens = _optional_count(data, "max_tokens")
        choices = _optional_count(data, "n", minimum=1) or 1
        input_chars = _text_chars(data.get("prompt"))
    elif operation is Operation.RESPONSES:
        max_output_tokens = _optional_count(data, "max_output_tokens")
        input_chars = _text_chars(data.get("input")) + _text_chars(data.get("instructions"))
        web_search_preview = _uses_web_search_preview(data.get("tools"))
        background = _optional_bool(data, "background") or False
    elif operation in (Operation.EMBEDDING, Operation.MODERATION):
        input_chars = _text_chars(data.get("input"))
    elif operation is Operation.SPEECH:
        # gpt-4o-mini-tts reads the instructions too: they count as input.
        text = data.get("input")
        input_chars = (len(text) if isinstance(text, str) else 0) + _text_chars(
            data.get("instructions")
        )
        characters = input_chars
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
        store=store,
        service_tier=service_tier,
        web_search_preview=web_search_preview,
        background=background,
    )
    # A background response lives upstream until it is fetched: OpenAI refuses
    # `background` with `store: false`, so it is left to the upstream's default
    # (the gateway lets it through only where storage is allowed).
    add_store = store is None and operation in STORE_DEFAULTED and not background
    # The gateway sets its own output limit at the body's start where none is
    # named (budget/output_limit.py): a limit named as null is dropped, since
    # JSON's last member would win over it, and a body the splice cannot take
    # (whitespace or a BOM first) is written anew.
    limit_field = OUTPUT_LIMIT_FIELD.get(operation) if max_output_tokens is None else None
    rewrite = False
    if limit_field is not None and (limit_field in data or body[:1] != b"{"):
        data.pop(limit_field, None)
        rewrite = True
    if operation in USAGE_INJECTED and stream and not client_wants_usage:
        data["stream_options"] = {**(stream_options or {}), "include_usage": True}
        if add_store:
            data["store"] = False
        body = _compact_json(data)
    elif add_store:
        if not rewrite and body[:1] == b"{" and "store" not in data:
            # Spliced in after the opening brace (the object has a model, so
            # a comma follows): no second serialisation.
            body = b'{"store":false,' + body[1:]
        else:  # "store": null, or a body in another encoding or after whitespace
            data["store"] = False
            body = _compact_json(data)
    elif rewrite:
        body = _compact_json(data)
    return info, body


def _uses_web_search_preview(tools: Any) -> bool:
    """True when a Responses request's tools name the preview web search tool."""
    if not isinstance(tools, list):
        return False
    return any(
        isinstance(tool, dict) and str(tool.get("type", "")).startswith("web_search_preview")
        for tool in tools
    )


def _messages(data: Mapping[str, Any]) -> list[Any]:
    """A chat request's `messages`: an array of message objects (OpenAI refuses anything else).

    An empty array is left to the upstream to refuse (it costs nothing).
    """
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages must be an array of messages", param="messages")
    if not all(isinstance(message, dict) for message in messages):
        raise InvalidRequest("each message must be an object", param="messages")
    return messages


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
    except RecursionError:
        # json.loads read it, but encoding from deeper in the stack overflows.
        raise InvalidRequest("The JSON body is nested too deeply", code="invalid_json") from None


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


# Deepest nesting of a prompt, input or messages value the gateway reads. Real
# requests nest a few levels (messages → content parts → text); the limit keeps
# a hostile body's depth away from any recursive code behind the gateway.
MAX_TEXT_NESTING = 64


def _text_chars(value: Any) -> int:
    """Characters of text in a prompt/input/messages value; a token id counts as 4.

    Iterative, with an explicit stack: a client's nesting depth must not
    become this process's recursion depth. Deeper than MAX_TEXT_NESTING is
    refused.
    """
    total = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            total += CHARS_PER_TOKEN
        elif isinstance(item, list | dict):
            if depth >= MAX_TEXT_NESTING:
                raise InvalidRequest(
                    f"The request nests deeper than {MAX_TEXT_NESTING} levels",
                    code="nested_too_deeply",
                )
            if isinstance(item, list):
                stack.extend((child, depth + 1) for child in item)
            else:
                stack.extend((item[key], depth + 1) for key in _TEXT_KEYS if key in item)
    return total


def _parse_audio_upload(operation: Operation, content_type: str, body: bytes) -> RequestInfo:
    fields, file_data = _multipart_fields(content_type, body)
    model = fields.get("model")
    if not model:
        raise InvalidRequest("you must provide a model parameter", param="model")
    stream_text = fields.get("stream", "false").strip().lower()
    if stream_text not in ("true", "false"):
        raise InvalidRequest("stream must be a boolean", param="stream")
    response_format = fields.get("response_format", "json").strip() or "json"
    seconds = None if file_data is None else audio_duration_seconds(file_data)
    if seconds is None and file_data is not None and response_format in UNMETERED_AUDIO_FORMATS:
        # Nothing would tell what to bill: these answers carry no usage.
        raise InvalidRequest(
            "The length of the uploaded audio could not be read, and "
            f"response_format '{response_format}' reports no usage to bill from. Send the "
            "audio as flac, m4a, mp3, mp4, mpeg, mpga, oga, ogg, opus, wav or webm, or ask "
            "for response_format 'json'.",
            param="file",
            code="audio_duration_unreadable",
        )
    return RequestInfo(
        operation=operation,
        model=model,
        stream=stream_text == "true",
        input_chars=len(fields.get("prompt", "")),
        audio_seconds=seconds,
        response_format=response_format,
    )


# The image model OpenAI uses for an edit or variation that names none.
DEFAULT_IMAGE_UPLOAD_MODEL = "dall-e-2"


def _parse_image_upload(operation: Operation, content_type: str, body: bytes) -> RequestInfo:
    """An image edit or variation: its text fields (the images are forwarded untouched)."""
    fields, _ = _multipart_fields(content_type, body)
    model = fields.get("model") or DEFAULT_IMAGE_UPLOAD_MODEL
    stream_text = fields.get("stream", "false").strip().lower()
    if stream_text not in ("true", "false"):
        raise InvalidRequest("stream must be a boolean", param="stream")
    n_text = fields.get("n", "1").strip() or "1"
    if not (n_text.isascii() and n_text.isdigit()) or int(n_text) < 1:
        raise InvalidRequest("n must be an integer of at least 1", param="n")
    return RequestInfo(
        operation=operation,
        model=model,
        stream=stream_text == "true",
        input_chars=len(fields.get("prompt", "")),
        images=int(n_text),
        image_size=fields.get("size") or "1024x1024",
        image_quality=fields.get("quality") or "standard",
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
