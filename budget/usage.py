"""What one request used, as read from the upstream's answer or estimated before it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType

from budget.operations import Operation

_NO_TOOL_CALLS: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Usage:
    """What one request used: tokens, audio seconds, speech characters or images.

    Token counts: `input_tokens`, `cached_input_tokens` and `output_tokens` are
    totals over every modality; the audio and image counts are the parts of
    them in that modality (`cached_audio_input_tokens` is part of both cached
    and audio input). `service_tier` is the tier that served the request
    (None: default); `tool_calls` counts calls of built-in tools billed per
    call, by price kind ("web_search", "file_search", "code_interpreter").

    `estimated` is True when the figures were not read from the upstream's own
    usage report (a hold, a stream that ended without usage, a length read from
    the upload); `source` says the same as text, as the usage event records it.
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
    audio_input_tokens: int = 0
    cached_audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    image_input_tokens: int = 0
    image_output_tokens: int = 0
    service_tier: str | None = None
    tool_calls: Mapping[str, int] = field(default_factory=lambda: _NO_TOOL_CALLS)

    @property
    def source(self) -> str:
        """Where the figures come from: "reported" (by the upstream) or "estimated"."""
        return "estimated" if self.estimated else "reported"

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens (reasoning and cached tokens are inside them)."""
        return self.input_tokens + self.output_tokens

    @property
    def has_tokens(self) -> bool:
        """True when any token count is above zero."""
        return self.input_tokens > 0 or self.output_tokens > 0
