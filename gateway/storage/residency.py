"""The `practice_residency` table: each practice's pinned regions and store rule."""

from __future__ import annotations

import time
from typing import Any

from gateway.residency import PracticeResidency, StoreRule
from gateway.storage import AnyDatabase

# Passed for a field the caller leaves as it is.
UNCHANGED: Any = object()


def _setting(regions: str | None, store: str | None) -> PracticeResidency:
    return PracticeResidency(
        regions=frozenset(regions.split(",")) if regions else None,
        store=store if store in ("allow", "deny") else None,  # type: ignore[arg-type]
    )


class ResidencyStore:
    def __init__(self, db: AnyDatabase) -> None:
        self.db = db

    async def load_all(self) -> dict[str, PracticeResidency]:
        async with self.db.read() as conn:
            rows = await conn.fetchall("SELECT practice_id, regions, store FROM practice_residency")
        return {row["practice_id"]: _setting(row["regions"], row["store"]) for row in rows}

    async def put(
        self,
        practice_id: str,
        *,
        regions: frozenset[str] | None = UNCHANGED,
        store: StoreRule | None = UNCHANGED,
    ) -> PracticeResidency:
        """Change the fields given (None: back to the gateway default); the result."""
        async with self.db.transaction(lock=f"residency:{practice_id}") as conn:
            row = await conn.fetchone(
                "SELECT regions, store FROM practice_residency WHERE practice_id = ?",
                practice_id,
            )
            current = _setting(row["regions"], row["store"]) if row else PracticeResidency()
            new = PracticeResidency(
                regions=current.regions if regions is UNCHANGED else regions,
                store=current.store if store is UNCHANGED else store,
            )
            await conn.execute(
                "INSERT INTO practice_residency (practice_id, regions, store, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (practice_id) DO UPDATE SET "
                "regions = excluded.regions, store = excluded.store, "
                "updated_at = excluded.updated_at",
                practice_id,
                ",".join(sorted(new.regions)) if new.regions is not None else None,
                new.store,
                int(time.time()),
            )
        return new
