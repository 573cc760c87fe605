"""What one request used, as read from the upstream's answer or estimated before it."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from budget.operations import Operation


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
