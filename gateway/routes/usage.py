"""GET /v1/ai-credit/usage: where a practice's money went (admin key).

`?from=&to=` (unix seconds; the license's current period by default),
`group_by=day|model|operation|device` (default day) gives sums per group
and the period's batches, each one entry with its line counts and cost (a
batch counts as one request of its group; its lines' usage is in the
sums); `format=csv` gives the events themselves, one line each (a batch's
lines too, request id `batch:<batch_id>:<custom_id>`), streamed page by
page (gateway/storage/usage_report.py) so a year of events never sits in
memory.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from budget.license import calendar_month
from budget.money import micros_to_usd
from credit.ports import Row
from gateway.errors import unprocessable
from gateway.routes.common import admin_practice_of, endpoint, ok, services_of
from gateway.storage.usage_report import (
    BatchEntry,
    EventFilters,
    GroupBy,
    UsageGroup,
    UsageReport,
    UsageSummary,
)

if TYPE_CHECKING:
    from gateway.services import Services

CSV_HEADER = (
    "time_utc",
    "created_at",
    "request_id",
    "device_id",
    "operation",
    "model",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "audio_seconds",
    "characters",
    "images",
    "cost_usd",
    "charged_budget_usd",
    "charged_credit_usd",
    "usage_estimated",
    "status",
)


def usd(micros: int) -> str:
    """Integer micro-USD as an exact decimal string with six places ("0.000072")."""
    return f"{micros_to_usd(micros):f}"


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """A parsed `from`/`to`/`group_by` query (and the console's filters)."""

    start: int
    end: int
    group_by: GroupBy
    filters: EventFilters


def _unix(params: Mapping[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    if text.isascii() and text.lstrip("-").isdigit():  # isdigit() alone takes "²"
        return int(text)
    try:  # the console's date fields send YYYY-MM-DD
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise unprocessable(
            f"'{name}' must be unix seconds or a date (YYYY-MM-DD).",
            code="invalid_time",
            param=name,
        ) from None
    return int(day.timestamp())


async def parse_usage_query(
    services: Services, practice_id: str, params: Mapping[str, str]
) -> UsageQuery:
    """The query's period (the license's current one by default), grouping and filters; 422
    for what cannot be read."""
    start = _unix(params, "from")
    end = _unix(params, "to")
    if start is None or end is None:
        state = await services.metering.state(practice_id)
        period = state.period or calendar_month(int(time.time()))
        start = period.start if start is None else start
        end = period.end if end is None else end
    if start >= end:
        raise unprocessable("'from' must be before 'to'.", code="invalid_period", param="from")
    raw_group = params.get("group_by") or GroupBy.DAY.value
    try:
        group_by = GroupBy(raw_group)
    except ValueError:
        raise unprocessable(
            "'group_by' must be one of day, model, operation, device.",
            code="invalid_group_by",
            param="group_by",
        ) from None
    filters = EventFilters(
        model=params.get("model") or None,
        operation=params.get("operation") or None,
        device=params.get("device") or None,
    )
    return UsageQuery(start=start, end=end, group_by=group_by, filters=filters)


def report_of(services: Services) -> UsageReport:
    return UsageReport(services.db, timezone=services.settings.credit.month_timezone)


def group_json(group: UsageGroup) -> dict[str, Any]:
    return {
        "key": group.key,
        "requests": group.requests,
        "batches": group.batches,
        "cost_usd": usd(group.cost_micros),
        "charged_budget_usd": usd(group.budget_micros),
        "charged_credit_usd": usd(group.credit_micros),
        "input_tokens": group.input_tokens,
        "cached_input_tokens": group.cached_input_tokens,
        "output_tokens": group.output_tokens,
        "reasoning_tokens": group.reasoning_tokens,
        "audio_seconds": round(group.audio_seconds, 3),
        "characters": group.characters,
        "images": group.images,
    }


def batch_json(batch: BatchEntry) -> dict[str, Any]:
    """A batch as every credit view shows it: one entry with its line counts and cost."""
    return {
        "batch_id": batch.batch_id,
        "status": batch.status,
        "endpoint": batch.endpoint,
        "model": batch.model,
        "device_id": batch.device_id,
        "lines": batch.lines,
        "completed_lines": batch.completed_lines,
        "failed_lines": batch.failed_lines,
        "input_tokens": batch.input_tokens,
        "output_tokens": batch.output_tokens,
        "estimate_micro_usd": batch.estimate_micros,
        "cost_micro_usd": batch.cost_micros,
        "cost_usd": usd(batch.cost_micros),
        "created_at": batch.created_at,
        "settled_at": batch.settled_at,
    }


# The most batches one answer lists (a batch is up to 50,000 lines; a practice runs a few a day).
MAX_BATCHES = 1000


def summary_json(summary: UsageSummary, batches: Iterable[BatchEntry] = ()) -> dict[str, Any]:
    return {
        "ok": True,
        "from": summary.start,
        "to": summary.end,
        "group_by": summary.group_by.value,
        "groups": [group_json(group) for group in summary.groups],
        "total_requests": summary.total_requests,
        "total_cost_usd": usd(summary.total_cost_micros),
        "batches": [batch_json(batch) for batch in batches],
    }


def _cell(value: object) -> str:
    """A CSV cell; text a spreadsheet would run as a formula is quoted with a leading '."""
    if value is None:
        return ""
    text = str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def csv_line(row: Row) -> list[str]:
    created = int(row["created_at"])
    return [
        datetime.fromtimestamp(created, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        str(created),
        _cell(row["request_id"]),
        _cell(row["device_id"]),
        _cell(row["operation_type"]),
        _cell(row["model"]),
        str(row["input_tokens"]),
        str(row["cached_input_tokens"]),
        str(row["output_tokens"]),
        str(row["reasoning_tokens"]),
        str(row["total_tokens"]),
        f"{float(row['audio_seconds']):g}",
        str(row["characters"]),
        str(row["images"]),
        usd(int(row["estimated_cost_micro_usd"])),
        usd(int(row["charged_budget_micro_usd"])),
        usd(int(row["charged_credit_micro_usd"])),
        "1" if row["usage_estimated"] else "0",
        _cell(row["status"]),
    ]


def _csv_text(lines: Iterable[Iterable[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows(lines)
    return buffer.getvalue()


async def csv_chunks(
    report: UsageReport, practice_id: str, query: UsageQuery, *, page_size: int = 1000
) -> AsyncIterator[bytes]:
    """The CSV of the query's events: the header, then a chunk per page of events."""
    yield _csv_text([CSV_HEADER]).encode()
    page: list[list[str]] = []
    async for row in report.events(
        practice_id,
        start=query.start,
        end=query.end,
        page_size=page_size,
        filters=query.filters,
    ):
        page.append(csv_line(row))
        if len(page) >= page_size:
            yield _csv_text(page).encode()
            page = []
    if page:
        yield _csv_text(page).encode()


def csv_response(report: UsageReport, practice_id: str, query: UsageQuery) -> Response:
    day = report.day_of
    name = f"aza-usage-{practice_id}-{day(query.start)}-{day(query.end - 1)}.csv"
    return StreamingResponse(
        csv_chunks(report, practice_id, query),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )


@endpoint
async def usage(request: Request) -> Response:
    """GET /v1/ai-credit/usage?from=&to=&group_by=day|model|operation|device[&format=csv]."""
    _, practice_id = await admin_practice_of(request)
    services = services_of(request)
    params = request.query_params
    query = await parse_usage_query(services, practice_id, params)
    report = report_of(services)
    out = params.get("format") or "json"
    if out == "csv":
        return csv_response(report, practice_id, query)
    if out != "json":
        raise unprocessable("'format' must be json or csv.", code="invalid_format", param="format")
    summary = await report.summary(
        practice_id, start=query.start, end=query.end, group_by=query.group_by
    )
    batches = await report.batches(practice_id, start=query.start, end=query.end, limit=MAX_BATCHES)
    return ok(summary_json(summary, batches))


routes: list[BaseRoute] = [Route("/v1/ai-credit/usage", usage, methods=["GET"])]
