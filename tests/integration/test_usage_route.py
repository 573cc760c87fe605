"""GET /v1/ai-credit/usage: sums and CSV against the usage events, on both engines."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from budget.pricing import PlanBook
from budget.usage import Operation, Usage
from gateway.storage import AnyDatabase
from gateway.storage.metering import MeteringStore
from gateway.storage.usage_report import UsageReport
from tests.integration.conftest import Gateway, StartGateway

ZURICH = ZoneInfo("Europe/Zurich")

# (seconds before now, model, operation, device, input, output, audio seconds, cost micro-USD)
EVENTS: list[tuple[int, str, Operation, str | None, int, int, str, int]] = [
    (60, "gpt-4o-mini", Operation.CHAT, "desk-1", 1000, 200, "0", 72),
    (61, "gpt-4o-mini", Operation.CHAT, "desk-2", 10, 5, "0", 1),
    (3600 * 5, "gpt-4o", Operation.RESPONSES, "desk-1", 5000, 900, "0", 21_500),
    (86_400 + 30, "whisper-1", Operation.TRANSCRIPTION, None, 0, 0, "61.5", 6_150),
    (86_400 + 31, "gpt-4o-mini", Operation.CHAT, "desk-1", 7, 3, "0", 3),
    (3 * 86_400, "text-embedding-3-small", Operation.EMBEDDING, "srv", 123_456, 0, "0", 2_470),
]
OUTSIDE = 2 * 86_400  # seconds before the license period starts: not in the default query


@pytest.fixture
async def recorded(
    db: AnyDatabase, metering: MeteringStore, practice: str, plans: PlanBook
) -> dict[str, Any]:
    """The events above, written at their times through the metering store."""
    state = await metering.state(practice)
    assert state.license is not None and state.period is not None
    now = state.period.start + 4 * 86_400 + 7_000
    clock = [float(now)]
    store = MeteringStore(db, plans=plans, clock=lambda: clock[0])
    times = []
    for n, (ago, model, operation, device, inp, out, audio, cost) in enumerate(EVENTS):
        clock[0] = float(now - ago)
        times.append(now - ago)
        usage = Usage(
            operation=operation,
            model=model,
            input_tokens=inp,
            output_tokens=out,
            audio_seconds=Decimal(audio),
        )
        await store.record_usage(
            state.license,
            state.period,
            usage,
            cost_micros=cost,
            request_id=f"req-usage-{n}",
            device_id=device,
        )
    # One event before the period: only an explicit `from` reaches it.
    clock[0] = float(state.period.start - OUTSIDE)
    await store.record_usage(
        state.license,
        state.period,
        Usage(operation=Operation.CHAT, model="gpt-4o-mini", input_tokens=1),
        cost_micros=999,
        request_id="req-usage-before",
        device_id="old",
    )
    return {"period": state.period, "now": now, "times": times}


@pytest.fixture
async def http(start_gateway: StartGateway) -> AsyncIterator[tuple[httpx.AsyncClient, Gateway]]:
    async with (
        start_gateway() as gw,
        httpx.AsyncClient(
            base_url=gw.root, timeout=10, headers={"Authorization": f"Bearer {gw.key}"}
        ) as client,
    ):
        yield client, gw


async def db_events(db: AnyDatabase, practice: str, start: int, end: int) -> list[Any]:
    async with db.read() as conn:
        return list(
            await conn.fetchall(
                "SELECT * FROM ai_usage_events WHERE practice_id = ? "
                "AND created_at >= ? AND created_at < ? ORDER BY created_at, id",
                practice,
                start,
                end,
            )
        )


def usd(micros: int) -> str:
    return str((Decimal(micros) / 1_000_000).quantize(Decimal("0.000001")))


def key_of(row: Any, group_by: str) -> str | None:
    if group_by == "day":
        return (
            datetime.fromtimestamp(row["created_at"], tz=UTC).astimezone(ZURICH).date().isoformat()
        )
    column = {"model": "model", "operation": "operation_type", "device": "device_id"}[group_by]
    value = row[column]
    return None if value is None else str(value)


@pytest.mark.parametrize("group_by", ["day", "model", "operation", "device"])
async def test_sums_per_group_match_the_usage_events(
    http: tuple[httpx.AsyncClient, Gateway], recorded: dict[str, Any], group_by: str
) -> None:
    """Each group's requests, cost and tokens are the sums of its events in the period."""
    client, gw = http
    period = recorded["period"]
    response = await client.get("/v1/ai-credit/usage", params={"group_by": group_by})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["ok"], body["from"], body["to"], body["group_by"]) == (
        True,
        period.start,
        period.end,
        group_by,
    )
    rows = await db_events(gw.db, gw.practice, period.start, period.end)
    assert len(rows) == len(EVENTS)
    expected: dict[str | None, dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "cost": 0, "input_tokens": 0, "output_tokens": 0, "audio": 0.0}
    )
    for row in rows:
        group = expected[key_of(row, group_by)]
        group["requests"] += 1
        group["cost"] += row["estimated_cost_micro_usd"]
        group["input_tokens"] += row["input_tokens"]
        group["output_tokens"] += row["output_tokens"]
        group["audio"] += row["audio_seconds"]
    got = {group["key"]: group for group in body["groups"]}
    assert set(got) == set(expected)
    for key, want in expected.items():
        assert got[key]["requests"] == want["requests"]
        assert got[key]["cost_usd"] == usd(want["cost"])
        assert got[key]["input_tokens"] == want["input_tokens"]
        assert got[key]["output_tokens"] == want["output_tokens"]
        assert got[key]["audio_seconds"] == pytest.approx(want["audio"])
    total = sum(cost for *_, cost in EVENTS)
    assert body["total_cost_usd"] == usd(total) == "0.030196"
    if group_by == "model":
        assert got["gpt-4o-mini"]["cost_usd"] == "0.000076"
        assert body["groups"][0]["key"] == "gpt-4o"  # largest cost first
    if group_by == "day":
        assert [g["key"] for g in body["groups"]] == sorted(got, key=str)


async def test_an_explicit_period_reaches_older_events(
    http: tuple[httpx.AsyncClient, Gateway], recorded: dict[str, Any]
) -> None:
    """from/to choose the events: the one before the license period, alone."""
    client, _ = http
    start = recorded["period"].start
    response = await client.get(
        "/v1/ai-credit/usage",
        params={"from": start - OUTSIDE, "to": start, "group_by": "device"},
    )
    body = response.json()
    assert body["groups"] == [
        {
            "key": "old",
            "requests": 1,
            "batches": 0,
            "cost_usd": "0.000999",
            "charged_budget_usd": "0.000999",
            "charged_credit_usd": "0.000000",
            "input_tokens": 1,
            "cached_input_tokens": 0,
            "output_tokens": 0,
            "reasoning_tokens": 0,
            "audio_seconds": 0,
            "characters": 0,
            "images": 0,
        }
    ]
    assert body["total_cost_usd"] == "0.000999"


async def test_csv_is_one_line_per_usage_event(
    http: tuple[httpx.AsyncClient, Gateway], recorded: dict[str, Any]
) -> None:
    """format=csv: a header and each event of the period, in time order, amounts exact."""
    client, gw = http
    period = recorded["period"]
    response = await client.get("/v1/ai-credit/usage", params={"format": "csv"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    lines = list(csv.DictReader(io.StringIO(response.text)))
    rows = await db_events(gw.db, gw.practice, period.start, period.end)
    assert [line["request_id"] for line in lines] == [row["request_id"] for row in rows]
    for line, row in zip(lines, rows, strict=True):
        assert int(line["created_at"]) == row["created_at"]
        assert line["device_id"] == (row["device_id"] or "")
        assert line["operation"] == row["operation_type"]
        assert line["model"] == row["model"]
        assert int(line["input_tokens"]) == row["input_tokens"]
        assert int(line["output_tokens"]) == row["output_tokens"]
        assert float(line["audio_seconds"]) == row["audio_seconds"]
        assert line["cost_usd"] == usd(row["estimated_cost_micro_usd"])
        assert line["charged_budget_usd"] == usd(row["charged_budget_micro_usd"])
        assert line["charged_credit_usd"] == usd(row["charged_credit_micro_usd"])
    assert sum(Decimal(line["cost_usd"]) for line in lines) == Decimal("0.030196")


async def test_events_are_read_in_pages_without_losing_ties(
    db: AnyDatabase, metering: MeteringStore, practice: str, plans: PlanBook
) -> None:
    """Paging by (created_at, id) returns every event once, also many in the same second."""
    state = await metering.state(practice)
    assert state.license is not None and state.period is not None
    second = float(state.period.start + 100)
    store = MeteringStore(db, plans=plans, clock=lambda: second)
    for n in range(23):
        await store.record_usage(
            state.license,
            state.period,
            Usage(operation=Operation.CHAT, model="gpt-4o-mini", input_tokens=n),
            cost_micros=n,
            request_id=f"tie-{n}",
        )
    report = UsageReport(db)
    seen = [
        row["request_id"]
        async for row in report.events(
            practice, start=state.period.start, end=state.period.end, page_size=5
        )
    ]
    assert seen == [f"tie-{n}" for n in range(23)]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"group_by": "week"}, "invalid_group_by"),
        ({"from": "200", "to": "100"}, "invalid_period"),
        ({"from": "yesterday"}, "invalid_time"),
        ({"format": "xml"}, "invalid_format"),
    ],
)
async def test_a_bad_query_is_refused_in_the_openai_shape(
    http: tuple[httpx.AsyncClient, Gateway], params: dict[str, str], code: str
) -> None:
    client, _ = http
    response = await client.get("/v1/ai-credit/usage", params=params)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == code


async def test_a_client_key_cannot_read_usage(http: tuple[httpx.AsyncClient, Gateway]) -> None:
    client, gw = http
    for fmt in ("json", "csv"):
        response = await client.get(
            "/v1/ai-credit/usage",
            params={"format": fmt},
            headers={"Authorization": f"Bearer {gw.client_key}"},
        )
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "admin_key_required"


async def test_the_csv_is_written_page_by_page(
    db: AnyDatabase, metering: MeteringStore, practice: str, plans: PlanBook
) -> None:
    """Each page of events becomes one chunk of the response: it is never held whole."""
    from gateway.routes.usage import UsageQuery, csv_chunks
    from gateway.storage.usage_report import EventFilters, GroupBy

    state = await metering.state(practice)
    assert state.license is not None and state.period is not None
    for n in range(23):
        await metering.record_usage(
            state.license,
            state.period,
            Usage(operation=Operation.CHAT, model="gpt-4o-mini", input_tokens=n),
            cost_micros=n,
            request_id=f"page-{n}",
        )
    query = UsageQuery(state.period.start, state.period.end, GroupBy.DAY, EventFilters())
    chunks = [chunk async for chunk in csv_chunks(UsageReport(db), practice, query, page_size=5)]
    assert len(chunks) == 1 + 5  # the header, then 5 + 5 + 5 + 5 + 3 events
    lines = b"".join(chunks).decode().splitlines()
    assert len(lines) == 24 and lines[0].startswith("time_utc,")
    assert [line.split(",")[2] for line in lines[1:]] == [f"page-{n}" for n in range(23)]
