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

from budget.batch import BATCH_ENDPOINTS
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
COALESCE(SUM(images), 0) AS images,
COALESCE(SUM(CASE WHEN request_id LIKE 'batch:%' THEN 1 ELSE 0 END), 0) AS batch_lines
"""

# A batch line's usage event (request id `batch:<batch_id>:<custom_id>`) joined to its
# batch: written by the batch's settle, so created at its `settled_at` (an indexed
# equality), and its request id starts with the batch's own prefix (no LIKE: ids hold `_`).
_LINE_OF_BATCH = (
    "e.practice_id = b.practice_id AND e.created_at = b.settled_at "
    "AND substr(e.request_id, 1, length(b.batch_id) + 7) = 'batch:' || b.batch_id || ':'"
)
_NOT_A_BATCH_LINE = " AND request_id NOT LIKE 'batch:%'"

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
    """The sums of one group's usage events (micro-USD, tokens, seconds, counts).

    `requests` counts a batch once, however many lines it had (`batches` of them
    were batches; their `batch_lines` line events are in every other sum).
    """

    key: str | None
    requests: int = 0
    batches: int = 0
    batch_lines: int = 0
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
        lines = int(row["batch_lines"])
        self.requests += int(row["requests"]) - lines
        self.batch_lines += lines
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
class BatchEntry:
    """One batch as the usage views show it: one entry, not one per line.

    `lines` is the input file's line count, `completed_lines` (charged) and
    `failed_lines` are known once it is settled; `cost_micros` is what it was
    charged, `estimate_micros` what it held while it ran. The token sums are
    those of its lines' usage events. `at` is when it was settled (its
    events' time), or created while it runs.
    """

    batch_id: str
    status: str
    endpoint: str
    model: str
    device_id: str | None
    lines: int
    completed_lines: int
    failed_lines: int
    estimate_micros: int
    cost_micros: int
    created_at: int
    settled_at: int | None
    input_tokens: int
    output_tokens: int

    @property
    def at(self) -> int:
        return self.created_at if self.settled_at is None else self.settled_at

    @property
    def operation(self) -> str:
        return BATCH_ENDPOINTS[self.endpoint].value


def _batch_entry(row: Row) -> BatchEntry:
    settled = row["settled_at"]
    return BatchEntry(
        batch_id=row["batch_id"],
        status=row["status"],
        endpoint=row["endpoint"],
        model=row["model"],
        device_id=row["device_id"],
        lines=int(row["lines"]),
        completed_lines=int(row["completed_lines"]),
        failed_lines=int(row["failed_lines"]),
        estimate_micros=int(row["estimate_micro_usd"]),
        cost_micros=int(row["cost_micro_usd"]),
        created_at=int(row["created_at"]),
        settled_at=None if settled is None else int(settled),
        input_tokens=int(row["input_tokens"]),
        output_tokens=int(row["output_tokens"]),
    )


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
        """Sums per group of the practice's events created in [start, end) (unix seconds);
        a batch counts as one request of its group (its lines' events share day, model,
        operation and device)."""
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
            batch_rows = await conn.fetchall(
                f"SELECT e.{expression} AS grp, COUNT(DISTINCT b.batch_id) AS batches "
                f"FROM aza_batches b JOIN ai_usage_events e ON {_LINE_OF_BATCH} "
                "WHERE b.practice_id = ? AND b.settled_at >= ? AND b.settled_at < ? "
                f"GROUP BY e.{expression}",
                practice_id,
                start,
                end,
            )
        groups: dict[str | None, UsageGroup] = {}
        for row in rows:
            key = self._key(group_by, row["grp"])
            groups.setdefault(key, UsageGroup(key)).add(row)
        for row in batch_rows:
            key = self._key(group_by, row["grp"])
            group = groups.setdefault(key, UsageGroup(key))
            group.batches += int(row["batches"])
            group.requests += int(row["batches"])
        if group_by is GroupBy.DAY:
            ordered = sorted(groups.values(), key=lambda g: g.key or "")
        else:
            ordered = sorted(groups.values(), key=lambda g: (-g.cost_micros, g.key or ""))
        return UsageSummary(start=start, end=end, group_by=group_by, groups=tuple(ordered))

    def _key(self, group_by: GroupBy, raw: object) -> str | None:
        if group_by is GroupBy.DAY:
            return self.day_of(int(str(raw)) * 3600)
        return None if raw is None else str(raw)

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
        batch_lines: bool = True,
    ) -> Sequence[Row]:
        """The newest `limit` events of [start, end) that match `filters`, newest first
        (without the batches' line events when `batch_lines` is False)."""
        where, args = (filters or EventFilters()).sql()
        if not batch_lines:
            where += _NOT_A_BATCH_LINE
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

    async def batches(
        self,
        practice_id: str,
        *,
        start: int,
        end: int,
        limit: int,
        filters: EventFilters | None = None,
    ) -> Sequence[BatchEntry]:
        """The newest `limit` batches settled (or, still running, created) in [start, end),
        newest first, each with the token sums of its lines.

        Filters: the operation of its endpoint, its creating device, and its
        model or the model of any of its lines (a response may name a dated
        model).
        """
        filters = filters or EventFilters()
        at = "COALESCE(b.settled_at, b.created_at)"
        where = ""
        args: list[object] = []
        if filters.operation:
            endpoints = [e for e, op in BATCH_ENDPOINTS.items() if op.value == filters.operation]
            if not endpoints:
                return ()
            where += f" AND b.endpoint IN ({', '.join('?' * len(endpoints))})"
            args += endpoints
        if filters.device:
            where += " AND b.device_id = ?"
            args.append(filters.device)
        having = ""
        if filters.model:
            having = " HAVING b.model = ? OR SUM(CASE WHEN e.model = ? THEN 1 ELSE 0 END) > 0"
            args += [filters.model, filters.model]
        async with self.db.read() as conn:
            rows = await conn.fetchall(
                "SELECT b.batch_id, b.status, b.endpoint, b.model, b.device_id, b.lines, "
                "b.completed_lines, b.failed_lines, b.estimate_micro_usd, b.cost_micro_usd, "
                "b.created_at, b.settled_at, COALESCE(SUM(e.input_tokens), 0) AS input_tokens, "
                "COALESCE(SUM(e.output_tokens), 0) AS output_tokens "
                f"FROM aza_batches b LEFT JOIN ai_usage_events e ON {_LINE_OF_BATCH} "
                f"WHERE b.practice_id = ? AND {at} >= ? AND {at} < ?{where} "
                f"GROUP BY b.batch_id{having} ORDER BY {at} DESC, b.batch_id DESC LIMIT ?",
                practice_id,
                start,
                end,
                *args,
                limit,
            )
        return [_batch_entry(row) for row in rows]


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
