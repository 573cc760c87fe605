"""Usage read from a whole (non-streamed) upstream response body."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any, TypedDict

from budget.audio import billed_seconds
from budget.operations import AUDIO_UPLOADS, IMAGE_OPERATIONS, Operation
from budget.request import RequestInfo
from budget.usage import Usage


def usage_from_response(info: RequestInfo, body: bytes) -> Usage | None:
    """Usage of a whole (non-streamed) response body; None when it reports none.

    Token counts are whole tokens, audio in seconds. The model recorded is the
    response's own `model` when it names one, the tier the one it names.
    """
    op = info.operation
    if op is Operation.SPEECH:
        # Audio bytes: no usage in the answer; the request's characters are
        # what tts-1 bills (token-billed models report usage only in SSE).
        return Usage(op, info.model, characters=info.characters)
    data = exact_json(body)
    model = info.model
    if data is not None and isinstance(data.get("model"), str) and data["model"]:
        model = data["model"]
    if op is Operation.MODERATION:
        return Usage(op, model)
    if op in AUDIO_UPLOADS:
        return _audio_usage(info, model, data)
    if data is None:
        return None
    return usage_of_object(info, model, data)


def usage_of_object(info: RequestInfo, model: str, data: Mapping[str, Any]) -> Usage | None:
    """Usage of a response object (also a stream's final one); None when it reports none."""
    op = info.operation
    usage = data.get("usage")
    if op in IMAGE_OPERATIONS:
        items = data.get("data")
        image_usage = Usage(
            op,
            model,
            images=len(items) if isinstance(items, list) else info.images,
            image_size=_str_or(data.get("size"), info.image_size),
            image_quality=_str_or(data.get("quality"), info.image_quality),
        )
        if isinstance(usage, dict):  # gpt-image models report tokens
            return replace(image_usage, **usage_tokens(op, usage))
        return image_usage
    if not isinstance(usage, dict):
        return None
    tier = data.get("service_tier")
    tool_calls = _tool_calls(info, data.get("output")) if op is Operation.RESPONSES else None
    return Usage(
        op,
        model,
        service_tier=tier if isinstance(tier, str) and tier else None,
        tool_calls=tool_calls or _NO_CALLS,
        **usage_tokens(op, usage),
    )


def _str_or(value: Any, default: str | None) -> str | None:
    return value if isinstance(value, str) and value else default


_NO_CALLS: Mapping[str, int] = MappingProxyType({})


def _tool_calls(info: RequestInfo, output: Any) -> Mapping[str, int] | None:
    """Built-in tool calls billed per call, counted from a Responses `output` list.

    Code interpreter is billed per container, so distinct containers are counted.
    """
    if not isinstance(output, list):
        return None
    counts: dict[str, int] = {}
    containers: set[str] = set()
    for item in output:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "web_search_call":
            fee = "web_search_preview" if info.web_search_preview else "web_search"
            counts[fee] = counts.get(fee, 0) + 1
        elif kind == "file_search_call":
            counts["file_search"] = counts.get("file_search", 0) + 1
        elif kind == "code_interpreter_call":
            container = item.get("container_id")
            containers.add(container if isinstance(container, str) else str(len(containers)))
    if containers:
        counts["code_interpreter"] = len(containers)
    return MappingProxyType(counts) if counts else None


# Decimal for fractions: durations stay exact. One decoder for all: json.loads
# with parse_float builds a new decoder and scanner on every call, which cost
# more than decoding a chat completion (~9 % of a request's CPU in-process).
_EXACT_DECODER = json.JSONDecoder(parse_float=Decimal)


def exact_json(text: bytes) -> dict[str, Any] | None:
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
    audio_input_tokens: int
    cached_audio_input_tokens: int
    audio_output_tokens: int
    image_input_tokens: int
    image_output_tokens: int


def usage_tokens(op: Operation, usage: Mapping[str, Any]) -> _TokenCounts:
    """Token counts of an OpenAI `usage` object as Usage keyword arguments.

    Chat, completions and embeddings say prompt/completion tokens (audio parts
    in their details); Responses, images, transcription and speech say
    input/output tokens. Speech output is audio; an image model's output is
    image tokens unless its details say otherwise.
    """
    if "prompt_tokens" in usage:
        return {
            "input_tokens": _count(usage, "prompt_tokens"),
            "cached_input_tokens": _count(usage, "prompt_tokens_details", "cached_tokens"),
            "output_tokens": _count(usage, "completion_tokens"),
            "reasoning_tokens": _count(usage, "completion_tokens_details", "reasoning_tokens"),
            "audio_input_tokens": _count(usage, "prompt_tokens_details", "audio_tokens"),
            "cached_audio_input_tokens": 0,
            "audio_output_tokens": _count(usage, "completion_tokens_details", "audio_tokens"),
            "image_input_tokens": 0,
            "image_output_tokens": 0,
        }
    # Transcriptions spell it input_token_details, everything else input_tokens_details.
    details = usage.get("input_tokens_details")
    if not isinstance(details, dict):
        details = usage.get("input_token_details")
    output_tokens = _count(usage, "output_tokens")
    audio_output = output_tokens if op is Operation.SPEECH else 0
    image_output = 0
    if op in IMAGE_OPERATIONS:
        out_details = usage.get("output_tokens_details")
        if isinstance(out_details, dict) and "image_tokens" in out_details:
            image_output = _count(out_details, "image_tokens")
        else:
            image_output = output_tokens
    return {
        "input_tokens": _count(usage, "input_tokens"),
        "cached_input_tokens": _count(details, "cached_tokens"),
        "output_tokens": output_tokens,
        "reasoning_tokens": _count(usage, "output_tokens_details", "reasoning_tokens"),
        "audio_input_tokens": _count(details, "audio_tokens"),
        "cached_audio_input_tokens": _count(details, "cached_tokens_details", "audio_tokens"),
        "audio_output_tokens": audio_output,
        "image_input_tokens": _count(details, "image_tokens"),
        "image_output_tokens": image_output,
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
    """Transcription/translation usage: what upstream reports, else the upload's length.

    Reported token usage (gpt-4o-transcribe family) or reported seconds
    (whisper-1 `usage.seconds`, else verbose_json's `duration`) come first;
    text/srt/vtt answers report nothing, so the upload's length, rounded to
    the second as OpenAI bills it, is charged as an estimate.
    """
    op = info.operation
    usage = data.get("usage") if data is not None else None
    if isinstance(usage, dict) and usage.get("type") == "tokens":
        return Usage(op, model, **usage_tokens(op, usage))
    if isinstance(usage, dict) and usage.get("type") == "duration":
        reported = _seconds(usage.get("seconds"))
        if reported is not None:
            return Usage(op, model, audio_seconds=reported)
    duration = _seconds(data.get("duration")) if data is not None else None
    if duration is not None:
        return Usage(op, model, audio_seconds=billed_seconds(duration))
    if info.audio_seconds is None:
        return None
    return Usage(
        op, model, audio_seconds=billed_seconds(info.audio_seconds, measured=True), estimated=True
    )
