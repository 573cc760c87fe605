"""Limits inside a practice: a key's or a device's monthly cap and rate limits (pure).

A practice's budget is one pot; these rules keep one key or one device
(`X-Device-Id`) from spending it alone. A cap is in micro-USD per budget
period and is enforced like the budget: a request is admitted while what
the subject used, plus what it has in flight, plus the request's estimate
fit the cap. Rate limits count requests and tokens per fixed window (a
minute by default): a request is admitted while its window has room, and
a refused one is told when the next window opens.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from budget.usage import Usage


class Scope(enum.StrEnum):
    """What a limit is set on (`ai_spend_limits.scope`)."""

    KEY = "key"
    DEVICE = "device"


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one key or device; None: no such limit."""

    monthly_cap_micros: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @property
    def empty(self) -> bool:
        return (
            self.monthly_cap_micros is None
            and self.requests_per_minute is None
            and self.tokens_per_minute is None
        )

    @property
    def rate_limited(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


@dataclass(frozen=True, slots=True)
class Subject:
    """A key (by its prefix) or a device of one practice, with its limits."""

    practice_id: str
    scope: Scope
    name: str
    limits: Limits


def cap_admits(
    *, used_micros: int, held_micros: int, estimate_micros: int, cap_micros: int
) -> bool:
    """Whether a request of `estimate_micros` fits the cap beside what is used and in flight."""
    return used_micros + held_micros + max(1, estimate_micros) <= cap_micros


@dataclass(frozen=True, slots=True)
class Window:
    """A fixed rate window: its start and how long until the next one (milliseconds)."""

    start_ms: int
    left_ms: int

    @property
    def retry_after_seconds(self) -> int:
        """Whole seconds until the next window (at least 1), for `retry-after`."""
        return max(1, -(-self.left_ms // 1000))


def window_at(now_ms: int, window_ms: int) -> Window:
    """The window `now_ms` falls in (windows start at multiples of `window_ms`)."""
    start = now_ms - now_ms % window_ms
    return Window(start_ms=start, left_ms=start + window_ms - now_ms)


def counted_tokens(estimate: Usage) -> int:
    """The tokens a request counts against tokens_per_minute when it is admitted.

    Like OpenAI's own limiter: the prompt's estimate plus the most it may
    produce (max_tokens or the default), not corrected after the answer.
    """
    return max(0, estimate.input_tokens) + max(0, estimate.output_tokens)
