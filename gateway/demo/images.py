"""What the fake upstream answers to image generations, edits and variations.

As OpenAI's API reference says: dall-e models answer `data` only; GPT image
models (gpt-image-1, gpt-image-1-mini, gpt-image-1.5) add `size`, `quality`
and token `usage` (text and image input tokens, image output tokens), and
with `stream: true` send `partial_images` partial-image events, then one
completed event per image carrying that image's usage.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from gateway.demo.answers import CREATED, Streamed, tokens_for
from gateway.demo.sse import sse_event

# One 1x1 transparent PNG: every image the fake makes.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)
# Output tokens of one image by quality and size (OpenAI's published table).
OUTPUT_TOKENS = {
    ("low", "1024x1024"): 272,
    ("low", "1024x1536"): 408,
    ("low", "1536x1024"): 400,
    ("medium", "1024x1024"): 1056,
    ("medium", "1024x1536"): 1584,
    ("medium", "1536x1024"): 1568,
    ("high", "1024x1024"): 4160,
    ("high", "1024x1536"): 6240,
    ("high", "1536x1024"): 6208,
}
# Image input tokens the fake counts per uploaded image of an edit.
IMAGE_INPUT_TOKENS = 323
# Extra image output tokens per partial image of a stream, as OpenAI bills them.
PARTIAL_IMAGE_TOKENS = 100


def is_gpt_image(model: str) -> bool:
    return model.startswith("gpt-image")


def _settings(payload: Mapping[str, Any]) -> tuple[str, str]:
    """The quality and size a GPT image model uses ("auto" resolved as the fake does)."""
    quality = str(payload.get("quality") or "auto")
    size = str(payload.get("size") or "auto")
    return (
        "medium" if quality == "auto" else quality,
        "1024x1024" if size == "auto" else size,
    )


def usage(payload: Mapping[str, Any], *, input_images: int, partials: int) -> dict[str, Any]:
    """One image's token usage."""
    quality, size = _settings(payload)
    text = tokens_for(str(payload.get("prompt", "")))
    image_in = IMAGE_INPUT_TOKENS * input_images
    out = OUTPUT_TOKENS.get((quality, size), 4160) + PARTIAL_IMAGE_TOKENS * partials
    return {
        "total_tokens": text + image_in + out,
        "input_tokens": text + image_in,
        "output_tokens": out,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image_in},
    }


def answer(
    payload: Mapping[str, Any], *, kind: str, input_images: int = 0
) -> dict[str, Any] | Streamed:
    """`kind` "generation", "edit" or "variation": the JSON body or the event stream."""
    model = str(payload.get("model") or ("gpt-image-1" if kind == "generation" else "dall-e-2"))
    count = int(payload.get("n") or 1)
    b64 = base64.b64encode(PNG).decode()
    stream = str(payload.get("stream", "false")).lower() == "true"
    if is_gpt_image(model) and stream:
        partials = int(payload.get("partial_images") or 0)
        prefix = "image_generation" if kind == "generation" else "image_edit"
        quality, size = _settings(payload)
        common = {
            "b64_json": b64,
            "created_at": CREATED,
            "size": size,
            "quality": quality,
            "background": "opaque",
            "output_format": "png",
        }
        chunks: list[bytes] = []
        for _ in range(count):
            for index in range(partials):
                event = {"type": f"{prefix}.partial_image", "partial_image_index": index}
                chunks.append(sse_event(f"{prefix}.partial_image", {**event, **common}))
            done = {
                "type": f"{prefix}.completed",
                **common,
                "usage": usage(payload, input_images=input_images, partials=partials),
            }
            chunks.append(sse_event(f"{prefix}.completed", done))
        return Streamed(chunks)
    body: dict[str, Any] = {"created": CREATED, "data": [{"b64_json": b64} for _ in range(count)]}
    if is_gpt_image(model):
        quality, size = _settings(payload)
        one = usage(payload, input_images=input_images, partials=0)
        # The prompt and input images are read once; each image is output.
        out = one["output_tokens"] * count
        body.update(
            size=size,
            quality=quality,
            usage={
                **one,
                "output_tokens": out,
                "total_tokens": one["input_tokens"] + out,
            },
        )
    return body
