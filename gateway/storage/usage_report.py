"""Where the money went: a practice's usage events summed per day, model, operation or device,
and the events themselves, page by page.

Sums come from the database (one GROUP BY), never from events loaded into
memory. Days are calendar days in the practice's time zone (Europe/Zurich by
default): the database sums per UTC hour, which every zone with whole-hour
offsets maps onto exactly one local day, and Python folds the hours (at most
8,784 rows for a year). The events are read in pages ordered by
(created_at, id), each page its own short read on the index of migration
011, so a year of events streams in constant memory and no connection is
held while the client reads.

Amounts are integer micro-USD.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from credit.ports import Database, Row


class GroupBy(enum.StrEnum):
    DAY = "day"
    MODEL = "model"
    OPERATION = "operation"
    DEVICE = "device"


# The column (or expression) each grouping sums by; day is by UTC hour, folded later.
_GROUP_EXPRESSIONS = {
    GroupBy.DAY: "created_at / 3600",
    GroupBy.MODEL: "model",
    GroupBy.OPERATION: "operation_type",
    GroupBy.DEVICE: "device_id",
}

_SUMS = """
COUNT(*) AS requests,
COALESCE(SUM(estimated_cost_micro_usd), 0) AS cost,
COALESCE(SUM(charged_budget_micro_usd), 0) AS budget,
COALESCE(SUM(charged_credit_micro_usd), 0) AS credit,
COALESCE(SUM(input_tokens), 0) AS input_tokens,
COALESCE(SUM(cached_input_tokens), 0) AS cached_input_tokens,
COALESCE(SUM(output_tokens), 0) AS output_tokens,
COALESCE(SUM(reasoning_tokens), 0) AS reasoning_tokens,
COALESCE(SUM(audio_seconds), 0) AS audio_seconds,
COALESCE(SUM(characters), 0) AS characters,
COALESCE(SUM(images), 0) AS images
"""

# The columns of one usage event as the CSV and the console's table show it.
EVENT_COLUMNS = (
    "id",
    "created_at",
    "request_id",
    "device_id",
    "operation_type",
    "model",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "audio_seconds",
    "characters",
    "images",
    "estimated_cost_micro_usd",
    "charged_budget_micro_usd",
    "charged_credit_micro_usd",
    "usage_estimated",
    "status",
)


@dataclass(slots=True)
class UsageGroup:
    """The sums of one group's usage events (micro-USD, tokens, seconds, counts)."""

    key: str | None
    requests: int = 0
    cost_micros: int = 0
    budget_micros: int = 0
    credit_micros: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    audio_seconds: float = 0.0
    characters: int = 0
    images: int = 0

    def add(self, row: Row) -> None:
        self.requests += int(row["requests"])
        self.cost_micros += int(row["cost"])
        self.budget_micros += int(row["budget"])
        self.credit_micros += int(row["credit"])
        self.input_tokens += int(row["input_tokens"])
        self.cached_input_tokens += int(row["cached_input_tokens"])
        self.output_tokens += int(row["output_tokens"])
        self.reasoning_tokens += int(row["reasoning_tokens"])
        self.audio_seconds += float(row["audio_seconds"])
        self.characters += int(row["characters"])
        self.images += int(row["images"])


@dataclass(frozen=True, slots=True)
class UsageSummary:
    """A practice's usage in [start, end), grouped; groups by cost, largest first
    (by day: in date order)."""

    start: int
    end: int
    group_by: GroupBy
    groups: Sequence[UsageGroup] = field(default_factory=tuple)

    @property
    def total_cost_micros(self) -> int:
        return sum(group.cost_micros for group in self.groups)

    @property
    def total_requests(self) -> int:
        return sum(group.requests for group in self.groups)


class UsageReport:
    """Read-only queries over `ai_usage_events` for one practice at a time."""

    def __init__(self, db: Database, *, timezone: str = "Europe/Zurich") -> None:
        self.db = db
        self.zone = ZoneInfo(timezone)

    async def summary(
        self, practice_id: str, *, start: int, end: int, group_by: GroupBy
    ) -> UsageSummary:
        """Sums per group of the practice's events created in [start, end) (unix seconds)."""
        expression = _GROUP_EXPRESSIONS[group_by]
        async with self.db.read() as conn:
            rows = await conn.fetchall(
                f"SELECT {expression} AS grp, {_SUMS} FROM ai_usage_events "
                "WHERE practice_id = ? AND created_at >= ? AND created_at < ? "
                f"GROUP BY {expression}",
                practice_id,
                start,
                end,
            )
        groups: dict[str | None, UsageGroup] = {}
        for row in rows:
            raw = row["grp"]
            if group_by is GroupBy.DAY:
                key: str | None = self.day_of(int(raw) * 3600)
            else:
                key = None if raw is None else str(raw)
            groups.setdefault(key, UsageGroup(key)).add(row)
        if group_by is GroupBy.DAY:
            ordered = sorted(groups.values(), key=lambda g: g.key or "")
        else:
            ordered = sorted(groups.values(), key=lambda g: (-g.cost_micros, g.key or ""))
        return UsageSummary(start=start, end=end, group_by=group_by, groups=tuple(ordered))

    def day_of(self, unix: int) -> str:
        """The practice's calendar day (YYYY-MM-DD) of a unix time."""
        return datetime.fromtimestamp(unix, tz=UTC).astimezone(self.zone).date().isoformat()

    async def events(
        self,
        practice_id: str,
        *,
        start: int,
        end: int,
        page_size: int = 1000,
        filters: EventFilters | None = None,
    ) -> AsyncIterator[Row]:
        """The practice's events created in [start, end), oldest first, read page by page."""
        where, args = (filters or EventFilters()).sql()
        after: tuple[int, int] = (start - 1, 0)
        columns = ", ".join(EVENT_COLUMNS)
        while True:
            async with self.db.read() as conn:
                page = await conn.fetchall(
                    f"SELECT {columns} FROM ai_usage_events "
                    "WHERE practice_id = ? AND created_at >= ? AND created_at < ? "
                    "AND (created_at > ? OR (created_at = ? AND id > ?))"
                    f"{where} ORDER BY created_at, id LIMIT ?",
                    practice_id,
                    start,
                    end,
                    after[0],
                    after[0],
                    after[1],
                    *args,
                    page_size,
                )
            for row in page:
                yield row
            if len(page) < page_size:
                return
            last = page[-1]
            after = (int(last["created_at"]), int(last["id"]))

    async def latest_events(
        self,
        practice_id: str,
        *,
        start: int,
        end: int,
        limit: int,
        filters: EventFilters | None = None,
    ) -> Sequence[Row]:
        """The newest `limit` events of [start, end) that match `filters`, newest first."""
        where, args = (filters or EventFilters()).sql()
        async with self.db.read() as conn:
            return await conn.fetchall(
                f"SELECT {', '.join(EVENT_COLUMNS)} FROM ai_usage_events "
                "WHERE practice_id = ? AND created_at >= ? AND created_at < ?"
                f"{where} ORDER BY created_at DESC, id DESC LIMIT ?",
                practice_id,
                start,
                end,
                *args,
                limit,
            )


@dataclass(frozen=True, slots=True)
class EventFilters:
    """Optional equality filters on the events (None: any)."""

    model: str | None = None
    operation: str | None = None
    device: str | None = None

    def sql(self) -> tuple[str, list[str]]:
        clauses: list[str] = []
        args: list[str] = []
        for column, value in (
            ("model", self.model),
            ("operation_type", self.operation),
            ("device_id", self.device),
        ):
            if value:
                clauses.append(f" AND {column} = ?")
                args.append(value)
        return "".join(clauses), args
