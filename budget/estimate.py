"""The usage a request is expected to cause, for the hold placed before it is forwarded."""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from types import MappingProxyType

from budget.audio import billed_seconds
from budget.operations import Operation
from budget.request import CHARS_PER_TOKEN, RequestInfo
from budget.usage import Usage

# Tokens every request costs beyond its text (role markers, message framing).
REQUEST_OVERHEAD_TOKENS = 8
# Audio length assumed when the uploaded file's duration cannot be read.
# A hold only reserves: the charge comes from the duration upstream reports.
# Ten minutes covers a typical dictation without a wrong, huge guess (a 25 MB
# upload can hold hours of low-bitrate audio) blocking a nearly empty budget.
UNKNOWN_AUDIO_SECONDS = Decimal(600)


def input_tokens_estimate(input_chars: int) -> int:
    """Estimated input tokens of `input_chars` characters: ceil(chars / 4) + 8 overhead."""
    return math.ceil(max(0, input_chars) / CHARS_PER_TOKEN) + REQUEST_OVERHEAD_TOKENS


# Output tokens gpt-image-1 bills per image, by quality and size (OpenAI's
# published table). Models priced per image ignore them; "standard", "auto"
# or an unknown size reserve the most a size can cost.
_IMAGE_OUTPUT_TOKENS: Mapping[str, int] = MappingProxyType(
    {
        "low:1024x1024": 272,
        "low:1024x1536": 408,
        "low:1536x1024": 400,
        "medium:1024x1024": 1056,
        "medium:1024x1536": 1584,
        "medium:1536x1024": 1568,
        "high:1024x1024": 4160,
        "high:1024x1536": 6240,
        "high:1536x1024": 6208,
    }
)
_MOST_IMAGE_OUTPUT_TOKENS = max(_IMAGE_OUTPUT_TOKENS.values())


def estimate_usage(info: RequestInfo, *, default_max_output_tokens: int) -> Usage:
    """Usage to hold for a request (estimated=True): tokens, audio seconds, characters, images.

    Input tokens are ceil(input_chars / 4) + 8 per request; output tokens are
    the request's max output tokens (else `default_max_output_tokens`) for
    every choice asked for. Audio of unknown duration counts as 600 seconds
    (UNKNOWN_AUDIO_SECONDS).
    """
    op = info.operation
    input_tokens = input_tokens_estimate(info.input_chars)
    if op in (Operation.CHAT, Operation.COMPLETION, Operation.RESPONSES):
        max_output = info.max_output_tokens
        if max_output is None:
            max_output = default_max_output_tokens
        return Usage(
            op,
            info.model,
            input_tokens=input_tokens,
            output_tokens=max_output * max(1, info.choices),
            service_tier=info.service_tier,
            estimated=True,
        )
    if op in (Operation.EMBEDDING, Operation.MODERATION):
        return Usage(op, info.model, input_tokens=input_tokens, estimated=True)
    if op is Operation.SPEECH:
        return Usage(op, info.model, characters=info.characters, estimated=True)
    if op in (Operation.TRANSCRIPTION, Operation.TRANSLATION):
        audio = info.audio_seconds
        seconds = (
            billed_seconds(audio, measured=True) if audio is not None else UNKNOWN_AUDIO_SECONDS
        )
        return Usage(op, info.model, audio_seconds=seconds, estimated=True)
    # Images: per-image prices use images/size/quality, token-priced models
    # (gpt-image-1) the prompt and the output tokens of each image.
    images = max(1, info.images)
    key = f"{info.image_quality}:{info.image_size}"
    per_image = _IMAGE_OUTPUT_TOKENS.get(key, _MOST_IMAGE_OUTPUT_TOKENS)
    return Usage(
        op,
        info.model,
        input_tokens=input_tokens,
        output_tokens=per_image * images,
        image_output_tokens=per_image * images,
        images=images,
        image_size=info.image_size,
        image_quality=info.image_quality,
        estimated=True,
    )
