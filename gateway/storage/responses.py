"""Responses stored upstream, whose they are, and background ones still to settle.

`ai_responses` has one row per response a practice made with `store` or
`background` through the gateway (other responses are not stored upstream,
so need none: the hot path writes nothing for them). A background response
is a job until settled (`done_at`): it keeps a hold row of its own
(`bg:<response id>`, counted by the gate like any hold), and its polling is
a job of the generic follower's queue (`aza_upstream_jobs`,
`gateway.followers`), queued in the same transaction, so a restart loses
nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from credit.ports import Connection, Database, Row


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response made through the gateway and stored upstream."""

    response_id: str
    practice_id: str
    request_id: str
    model: str
    upstream: str | None
    service_tier: str | None
    web_search_preview: bool
    hold_micros: int
    created_at: int
    pending: bool  # a background response not yet settled


_COLUMNS = (
    "response_id, practice_id, request_id, model, upstream, service_tier, web_search_preview, "
    "hold_micro_usd, created_at, done_at"
)


def _row(row: Row) -> StoredResponse:
    get = row.__getitem__
    return StoredResponse(
        response_id=str(get("response_id")),
        practice_id=str(get("practice_id")),
        request_id=str(get("request_id")),
        model=str(get("model")),
        upstream=get("upstream"),
        service_tier=get("service_tier"),
        web_search_preview=bool(get("web_search_preview")),
        hold_micros=int(get("hold_micro_usd")),
        created_at=int(get("created_at")),
        pending=get("done_at") is None,
    )


def background_hold_id(response_id: str) -> str:
    return "bg:" + response_id


class ResponseStore:
    """The `ai_responses` table (and the hold rows of background responses)."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self._clock = clock

    async def register(
        self,
        response: StoredResponse,
        *,
        hold_seconds: int = 0,
        queue: Callable[[Connection], Awaitable[object]] | None = None,
    ) -> bool:
        """Record a stored response; a pending one also gets its own hold, and `queue`
        (which queues its follower job) runs in the same transaction. False if known."""
        now = int(self._clock())
        async with self.db.transaction(lock=response.practice_id) as conn:
            added = await conn.execute(
                "INSERT INTO ai_responses (response_id, practice_id, request_id, model, upstream, "
                "service_tier, web_search_preview, hold_micro_usd, created_at, done_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (response_id) DO NOTHING",
                response.response_id,
                response.practice_id,
                response.request_id,
                response.model,
                response.upstream,
                response.service_tier,
                int(response.web_search_preview),
                response.hold_micros,
                now,
                None if response.pending else now,
            )
            if added and response.pending and response.hold_micros > 0:
                await conn.execute(
                    "INSERT INTO ai_budget_holds (hold_id, practice_id, request_id, "
                    "amount_micro_usd, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                    background_hold_id(response.response_id),
                    response.practice_id,
                    response.request_id,
                    response.hold_micros,
                    now,
                    now + hold_seconds,
                )
            if added and response.pending and queue is not None:
                await queue(conn)
        return bool(added)

    async def get(self, response_id: str) -> StoredResponse | None:
        """The stored response with this id, or None."""
        async with self.db.read() as conn:
            row = await conn.fetchone(
                f"SELECT {_COLUMNS} FROM ai_responses WHERE response_id = ?", response_id
            )
        return None if row is None else _row(row)

    async def finish(self, conn: Connection, response: StoredResponse) -> bool:
        """Mark a background response settled and drop its hold, in `conn`'s transaction.

        False when it was settled already (by another instance, or the client's poll).
        """
        done = await conn.execute(
            "UPDATE ai_responses SET done_at = ? WHERE response_id = ? AND done_at IS NULL",
            int(self._clock()),
            response.response_id,
        )
        await conn.execute(
            "DELETE FROM ai_budget_holds WHERE hold_id = ?",
            background_hold_id(response.response_id),
        )
        return bool(done)
