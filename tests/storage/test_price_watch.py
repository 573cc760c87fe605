"""Unpriced refusals counted per model and day, on both engines."""

from __future__ import annotations

from gateway.storage import AnyDatabase
from gateway.storage.price_watch import ModelSeen, PriceWatch

DAY = 86_400


async def test_refusals_are_counted_per_model_and_day(db: AnyDatabase) -> None:
    """Three refusals over two days add up; a refusal older than the window is left out."""
    now = [10 * DAY + 100.0]
    watch = PriceWatch(db, clock=lambda: now[0])
    await watch.record_refusal("gpt-9")
    await watch.record_refusal("gpt-9")
    now[0] += DAY
    await watch.record_refusal("gpt-9")
    await watch.record_refusal("o9")
    assert await watch.models_seen(2) == [ModelSeen("gpt-9", 0, 3), ModelSeen("o9", 0, 1)]
    now[0] += 5 * DAY
    assert await watch.models_seen(1) == []
