"""Usage read from a whole (non-streamed) upstream response body."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from typing import Any, TypedDict

from budget.operations import AUDIO_UPLOADS, Operation
from budget.request import RequestInfo
from budget.usage import Usage


def usage_from_response(info: RequestInfo, body: bytes) -> Usage | None:
    """Usage of a whole (non-streamed) response body; None when it reports none.

    Token counts are whole tokens, audio in seconds. The model recorded is the
    response's own `model` when it names one.
    """
    op = info.operation
    if op is Operation.SPEECH:
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
            return replace(image_usage, **usage_tokens(op, usage))
        return image_usage
    if not isinstance(usage, dict):
        return None
    return Usage(op, model, **usage_tokens(op, usage))


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


def usage_tokens(op: Operation, usage: Mapping[str, Any]) -> _TokenCounts:
    """Token counts of an OpenAI `usage` object as Usage keyword arguments."""
    if "prompt_tokens" in usage:  # chat, completions, embeddings
        return {
            "input_tokens": _count(usage, "prompt_tokens"),
            "cached_input_tokens": _count(usage, "prompt_tokens_details", "cached_tokens"),
            "output_tokens": _count(usage, "completion_tokens"),
            "reasoning_tokens": _count(usage, "completion_tokens_details", "reasoning_tokens"),
        }
    # Responses, images and audio: input_tokens / output_tokens.
    details = "input_token_details" if op in AUDIO_UPLOADS else "input_tokens_details"
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
        return Usage(op, model, audio_seconds=seconds or Decimal(0), **usage_tokens(op, usage))
    if seconds is None:
        return None
    return Usage(op, model, audio_seconds=seconds)
