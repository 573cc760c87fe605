"""Holds of running requests outlive `hold_ttl_seconds`: renewed while the request runs.

A hold expires by itself so that a gateway that dies does not keep a
practice's money reserved for ever. A request that is still running (a
reasoning model streaming for many minutes) must keep its hold, or other
requests would be admitted against money it is about to spend. The
metering middleware registers each admitted request's hold row here and
removes it when the request has settled; a background loop of the app
(`Services.hold_renewal_loop`) pushes the expiry of every registered row
forward every third of the TTL, in one statement per 500 rows. A lease row
(several requests' shares) stays alive while any of its requests runs. The
key and device cap holds of a request (`ai_limit_holds`, gateway.storage.limits)
are renewed the same way, by a second instance on that table.

Per request this costs two dict updates; the database sees one UPDATE per
renewal round per instance, never one per request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from credit.ports import Database

_BATCH = 500
# The tables whose rows are renewed (a fixed set: the name goes into the SQL).
TABLES = frozenset({"ai_budget_holds", "ai_limit_holds"})


class RunningHolds:
    """The hold rows of this instance's requests in flight, and their renewal."""

    def __init__(
        self,
        db: Database,
        *,
        hold_ttl_seconds: int,
        clock: Callable[[], float] = time.time,
        table: str = "ai_budget_holds",
    ) -> None:
        if table not in TABLES:
            raise ValueError(f"not a holds table: {table}")
        self.db = db
        self.table = table
        self.hold_ttl_seconds = hold_ttl_seconds
        self._clock = clock
        # hold row id → requests running on it
        self._running: dict[str, int] = {}

    @property
    def interval_seconds(self) -> float:
        """How often to renew: a third of the TTL, so one missed round is harmless."""
        return max(0.2, self.hold_ttl_seconds / 3)

    def add(self, hold_id: str) -> None:
        self._running[hold_id] = self._running.get(hold_id, 0) + 1

    def discard(self, hold_id: str) -> None:
        left = self._running.get(hold_id, 0) - 1
        if left > 0:
            self._running[hold_id] = left
        else:
            self._running.pop(hold_id, None)

    def __len__(self) -> int:
        return len(self._running)

    async def renew(self) -> int:
        """Push every running hold's expiry to now + TTL. Returns the rows renewed."""
        ids = list(self._running)
        if not ids:
            return 0
        # Rounded up: expiries are whole seconds compared with a whole `now`, and
        # rounding down would leave a renewed hold less than a TTL (with a TTL of
        # 1 s, sometimes less than the renewal interval) before it looks expired.
        expires_at = math.ceil(self._clock()) + self.hold_ttl_seconds
        renewed = 0
        for start in range(0, len(ids), _BATCH):
            batch = ids[start : start + _BATCH]
            marks = ", ".join("?" * len(batch))
            async with self.db.transaction() as conn:
                renewed += await conn.execute(
                    f"UPDATE {self.table} SET expires_at = ? "
                    f"WHERE hold_id IN ({marks}) AND expires_at < ?",
                    expires_at,
                    *batch,
                    expires_at,
                )
        return renewed
