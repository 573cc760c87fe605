"""Which models practices use, priced or not: the data of `aza-gateway prices check`.

Refusals for want of a price are counted per model and UTC day in
`ai_unpriced_refusals` (an upsert on the refusal path only, never on an
admitted request); models used are read from `ai_usage_events`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from credit.ports import Database

_DAY = 86_400


@dataclass(frozen=True, slots=True)
class ModelSeen:
    """A model named by requests since some time: usage events and refusals."""

    model: str
    events: int
    refusals: int


class PriceWatch:
    """The `ai_unpriced_refusals` table, and the models seen in usage."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self._clock = clock

    async def record_refusal(self, model: str) -> None:
        """Count one request refused because `model` (or its tier) has no price."""
        now = int(self._clock())
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO ai_unpriced_refusals (model, day, refusals, last_refused_at) "
                "VALUES (?, ?, 1, ?) ON CONFLICT (model, day) DO UPDATE SET "
                "refusals = ai_unpriced_refusals.refusals + 1, last_refused_at = ?",
                model,
                now // _DAY,
                now,
                now,
            )

    async def models_seen(self, days: int) -> list[ModelSeen]:
        """Models in usage events or refused as unpriced during the last `days` days."""
        now = int(self._clock())
        since = now - days * _DAY
        async with self.db.read() as conn:
            used = await conn.fetchall(
                "SELECT model, COUNT(*) AS n FROM ai_usage_events WHERE created_at >= ? "
                "GROUP BY model",
                since,
            )
            refused = await conn.fetchall(
                "SELECT model, SUM(refusals) AS n FROM ai_unpriced_refusals WHERE day >= ? "
                "GROUP BY model",
                since // _DAY,
            )
        events = {str(row["model"]): int(row["n"]) for row in used}
        refusals = {str(row["model"]): int(row["n"]) for row in refused}
        return [
            ModelSeen(model, events.get(model, 0), refusals.get(model, 0))
            for model in sorted(events.keys() | refusals.keys())
        ]
