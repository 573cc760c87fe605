"""What the fake upstream answers to embeddings, speech, images, moderations and models.

Pure functions from a parsed request to OpenAI's wire format, deterministic
for a given input (embedding vectors are seeded by the text, the image is one
1x1 PNG, speech is bytes in proportion to the text).
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
from collections.abc import Mapping
from typing import Any

from gateway.demo import images as image_answers
from gateway.demo.answers import CREATED, error_body, tokens_for
from gateway.demo.sse import sse_event

MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1",
    "text-embedding-3-small",
    "whisper-1",
    "tts-1",
    "dall-e-3",
    "gpt-image-1",
    "omni-moderation-latest",
)
_EMBEDDING_DIMENSIONS = {"text-embedding-3-large": 3072}


def embeddings(payload: Mapping[str, Any]) -> dict[str, Any]:
    """`POST /v1/embeddings`: one deterministic unit vector per input."""
    model = payload.get("model", "text-embedding-3-small")
    raw = payload.get("input", "")
    inputs: list[Any] = (
        raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    )
    dimensions = int(payload.get("dimensions") or _EMBEDDING_DIMENSIONS.get(model, 1536))
    as_base64 = payload.get("encoding_format") == "base64"
    data = []
    total = 0
    for index, item in enumerate(inputs):
        text = item if isinstance(item, str) else " ".join(str(t) for t in item)
        total += len(item) if isinstance(item, list) else tokens_for(text)
        vector = _vector(text, dimensions)
        embedding: Any = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            if as_base64
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }


def speech_events(payload: Mapping[str, Any]) -> list[bytes]:
    """`POST /v1/audio/speech` with `stream_format: "sse"`: audio deltas, then the usage.

    Token-billed models (gpt-4o-mini-tts) report input tokens (the input and
    the instructions) and audio output tokens (about 8 per token of text).
    """
    text = str(payload.get("input", ""))
    spoken = str(payload.get("instructions") or "") + text
    audio = base64.b64encode(speech(payload)).decode()
    out = tokens_for(text) * 8
    usage = {
        "input_tokens": tokens_for(spoken),
        "output_tokens": out,
        "total_tokens": tokens_for(spoken) + out,
    }
    return [
        sse_event("speech.audio.delta", {"type": "speech.audio.delta", "audio": audio}),
        sse_event("speech.audio.done", {"type": "speech.audio.done", "usage": usage}),
    ]


def speech(payload: Mapping[str, Any]) -> bytes:
    """`POST /v1/audio/speech`: an MPEG frame header, then filler in proportion to the text."""
    text = str(payload.get("input", ""))
    return b"\xff\xfb\x90\x64" + hashlib.sha256(text.encode()).digest() * (1 + len(text) // 8)


def images(payload: Mapping[str, Any]) -> Any:
    """`POST /v1/images/generations` (see gateway.demo.images)."""
    return image_answers.answer(payload, kind="generation")


def moderations(payload: Mapping[str, Any]) -> dict[str, Any]:
    """`POST /v1/moderations`: nothing flagged, one result per input."""
    raw = payload.get("input", "")
    inputs = raw if isinstance(raw, list) else [raw]
    categories = ("harassment", "hate", "self-harm", "sexual", "violence")
    result = {
        "flagged": False,
        "categories": dict.fromkeys(categories, False),
        "category_scores": dict.fromkeys(categories, 0.0001),
    }
    return {
        "id": "modr-fake",
        "model": payload.get("model") or "omni-moderation-latest",
        "results": [result for _ in inputs],
    }


def models() -> dict[str, Any]:
    """`GET /v1/models`."""
    return {"object": "list", "data": [model(name) for name in MODELS]}


def model(name: str) -> dict[str, Any]:
    """`GET /v1/models/{name}` for a known model."""
    return {"id": name, "object": "model", "created": CREATED, "owned_by": "openai"}


def model_not_found(name: str) -> dict[str, Any]:
    """The 404 body for an unknown model."""
    return error_body(
        f"The model '{name}' does not exist", type="invalid_request_error", code="model_not_found"
    )


def _vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for `text`."""
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    values = [rng.uniform(-1.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]
