"""Files and Batch APIs through the gateway with the official SDK: ownership, gating at the
batch price, per-line charges, cancel, restart; against the fake upstream's lifecycle."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from budget.batch import MAX_BATCH_FILE_BYTES
from budget.operations import Operation
from budget.usage import Usage
from gateway.demo.files_batches import FakeFilesBatches
from gateway.storage.usage_report import EventFilters, UsageReport
from tests.integration.conftest import Gateway, StartGateway, Upstream

FAST = {"job_poll_min_seconds": 0.05, "job_poll_max_seconds": 0.2}
MODEL = "gpt-4o-mini"
# gpt-4o-mini's batch prices (config/prices.toml), USD per 1M tokens = micro-USD per token.
BATCH_INPUT, BATCH_OUTPUT = Decimal("0.075"), Decimal("0.30")


def chat_line(n: int, *, model: str = MODEL, url: str = "/v1/chat/completions") -> dict[str, Any]:
    return {
        "custom_id": f"brief-{n}",
        "method": "POST",
        "url": url,
        "body": {
            "model": model,
            "max_tokens": 60,
            "messages": [{"role": "user", "content": f"Fasse Befund {n} kurz zusammen."}],
        },
    }


def jsonl(lines: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def fake(upstream: Upstream) -> FakeFilesBatches:
    return upstream.fake.files_batches


async def until(check: Callable[[], Any], within: float = 15.0) -> Any:
    """Wait for `check()` (sync or async) to return something truthy."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def batch_row(gw: Gateway, batch_id: str) -> dict[str, Any] | None:
    async with gw.db.read() as conn:
        row = await conn.fetchone("SELECT * FROM aza_batches WHERE batch_id = ?", batch_id)
    return None if row is None else {key: row[key] for key in row.keys()}  # noqa: SIM118  (a row iterates values)


async def settled_row(gw: Gateway, batch_id: str, within: float = 15.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        row = await batch_row(gw, batch_id)
        return row if row and row["settled_at"] is not None else None

    result: dict[str, Any] = await until(check, within)
    return result


def expected_cost(upstream: Upstream, batch_id: str) -> int:
    """What the fake's completed lines cost at the batch price, rounded up per line."""
    total = 0
    for raw in fake(upstream).done_lines[batch_id]:
        line = json.loads(raw)
        if line["error"] is not None or line["response"]["status_code"] != 200:
            continue
        usage = line["response"]["body"]["usage"]
        cost = usage["prompt_tokens"] * BATCH_INPUT + usage["completion_tokens"] * BATCH_OUTPUT
        total += math.ceil(cost)
    return total


@pytest.fixture
async def fast_gateway(start_gateway: StartGateway) -> AsyncIterator[Gateway]:
    async with start_gateway(**FAST) as gw:
        yield gw


async def test_a_100_line_chat_batch_is_charged_exactly_at_the_batch_price(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """100 lines: one usage event per line at the batch price, the hold released, one entry."""
    gw = fast_gateway
    client = gw.client()
    uploaded = await client.files.create(
        file=("letters.jsonl", jsonl(chat_line(n) for n in range(100))), purpose="batch"
    )
    assert uploaded.purpose == "batch" and uploaded.bytes > 0
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "validating"
    row = await settled_row(gw, batch.id)
    events = await gw.events()
    assert len(events) == 100
    assert {e["request_id"] for e in events} == {f"batch:{batch.id}:brief-{n}" for n in range(100)}
    expected = expected_cost(upstream, batch.id)
    assert sum(e["estimated_cost_micro_usd"] for e in events) == expected == row["cost_micro_usd"]
    assert row["status"] == "completed" and row["completed_lines"] == 100
    assert await gw.holds() == 0
    done = await client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.output_file_id
    content = await client.files.content(done.output_file_id)
    assert len(content.read().splitlines()) == 100
    history = await gw.client().get("/ai-credit/history", cast_to=object)
    entries = history["batches"]  # type: ignore[index]
    assert [(b["batch_id"], b["lines"], b["cost_micro_usd"]) for b in entries] == [
        (batch.id, 100, expected)
    ]


USD = 1_000_000


async def spend_all_but(gw: Gateway, leave_micros: int) -> None:
    """Use up the practice's 20 USD budget except `leave_micros`."""
    state = await gw.metering.state(gw.practice)
    assert state.license is not None and state.period is not None
    await gw.metering.record_usage(
        state.license,
        state.period,
        Usage(operation=Operation.CHAT, model="gpt-4o"),
        cost_micros=state.snapshot.budget_micros - leave_micros,
        request_id="pre-spend",
    )


async def test_a_batch_the_practice_cannot_afford_is_refused_up_front(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """Nearly empty budget: 429 insufficient_quota with message_user; nothing upstream, no hold."""
    gw = fast_gateway
    client = gw.client()
    uploaded = await client.files.create(
        file=("letters.jsonl", jsonl(chat_line(n) for n in range(100))), purpose="batch"
    )
    await spend_all_but(gw, 50)
    with pytest.raises(openai.RateLimitError) as refused:
        await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    body = refused.value.response.json()
    assert body["error"]["type"] == "insufficient_quota" and body["message_user"]
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert fake(upstream).batches == {}
    assert await gw.holds() == 0
    assert await gw.client().get("/ai-credit/history", cast_to=object) is not None


@pytest.mark.parametrize(
    ("first_model", "bad_line", "says"),
    [
        (MODEL, b"{not json", "not a JSON object"),
        (MODEL, json.dumps(chat_line(1, url="/v1/embeddings")).encode(), "not the batch's"),
        (MODEL, json.dumps(chat_line(1, model="gpt-4o")).encode(), "differs from the batch's"),
        (MODEL, json.dumps(chat_line(0)).encode(), "is used twice"),
        ("no-such-model", json.dumps(chat_line(1)).encode(), "cannot be priced"),
        (
            MODEL,
            json.dumps({**chat_line(1), "body": {**chat_line(1)["body"], "stream": True}}).encode(),
            "cannot stream",
        ),
    ],
)
async def test_a_line_the_gateway_cannot_meter_is_a_400_naming_it(
    fast_gateway: Gateway, upstream: Upstream, first_model: str, bad_line: bytes, says: str
) -> None:
    """A line it cannot meter: 400 in the OpenAI shape naming the line; nothing held or
    forwarded (an unpriced model fails on line 1, the others on line 2)."""
    gw = fast_gateway
    client = gw.client()
    content = json.dumps(chat_line(0, model=first_model)).encode() + b"\n" + bad_line + b"\n"
    uploaded = await client.files.create(file=("in.jsonl", content), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    error = refused.value.response.json()["error"]
    line = "Line 1" if first_model != MODEL else "Line 2"
    assert error["message"].startswith(line) and says in error["message"]
    assert error["type"] == "invalid_request_error"
    assert fake(upstream).batches == {} and await gw.holds() == 0
    assert await batch_row(gw, "any") is None


async def test_a_file_over_the_limit_is_a_400_and_never_stored(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """POST /v1/files past max_file_bytes: 400 file_too_large; the upstream keeps nothing."""
    async with start_gateway(max_file_bytes=1000, **FAST) as gw:
        client = gw.client()
        with pytest.raises(openai.BadRequestError) as refused:
            await client.files.create(file=("big.jsonl", b"x" * 2_000_000), purpose="batch")
        assert refused.value.response.json()["error"]["code"] == "file_too_large"
        assert fake(upstream).files == {}
        small = await client.files.create(file=("small.jsonl", b"{}\n"), purpose="batch")
        assert small.bytes == 3


async def test_a_cancelled_batch_is_charged_for_its_completed_lines_only(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """37 of 100 lines done, then cancel: 37 usage events; its hold outlived its TTL meanwhile."""
    async with start_gateway(hold_ttl_seconds=1, **FAST) as gw:
        client = gw.client()
        fake(upstream).lines_per_poll = 0  # runs, completes nothing until told
        uploaded = await client.files.create(
            file=("letters.jsonl", jsonl(chat_line(n) for n in range(100))), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        row = await until(lambda: batch_row(gw, batch.id))

        async def running() -> bool:
            current = await batch_row(gw, batch.id)
            return current is not None and current["status"] == "in_progress"

        await until(running)
        # Past the hold's own life (1 s): the follower keeps it alive.
        started = asyncio.get_running_loop().time()
        await until(lambda: asyncio.get_running_loop().time() - started > 2.2 or None)
        assert await gw.metering.sweep_expired_holds() == 0
        assert await gw.holds() == 1
        fake(upstream).advance(batch.id, 37)
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling"
        row = await settled_row(gw, batch.id)
        events = await gw.events()
        assert len(events) == 37 and row["status"] == "cancelled"
        assert sum(e["estimated_cost_micro_usd"] for e in events) == expected_cost(
            upstream, batch.id
        )
        assert row["cost_micro_usd"] == expected_cost(upstream, batch.id)
        assert await gw.holds() == 0


async def test_a_gateway_restart_while_a_batch_runs_loses_nothing(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """The instance that started a batch stops; a new one resumes following and charges it."""
    fake(upstream).lines_per_poll = 0
    async with start_gateway(**FAST) as first:
        client = first.client()
        uploaded = await client.files.create(
            file=("letters.jsonl", jsonl(chat_line(n) for n in range(20))), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        async def running() -> bool:
            row = await batch_row(first, batch.id)
            return row is not None and row["status"] == "in_progress"

        await until(running)
    retrieves = fake(upstream).retrieves
    fake(upstream).lines_per_poll = None
    async with start_gateway(**FAST) as second:
        row = await settled_row(second, batch.id)
        assert fake(upstream).retrieves > retrieves
        events = await second.events()
        assert len(events) == 20 and row["status"] == "completed"
        assert row["cost_micro_usd"] == expected_cost(upstream, batch.id)
        assert await second.holds() == 0


async def test_another_practice_cannot_see_read_cancel_or_delete_them(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """Practice B: lists none of A's files and batches; each of A's ids is a 404 (a 400 in a
    batch it tries to create); A's objects are untouched."""
    gw = fast_gateway
    a = gw.client()
    fake(upstream).lines_per_poll = 0
    uploaded = await a.files.create(
        file=("letters.jsonl", jsonl(chat_line(n) for n in range(3))), purpose="batch"
    )
    batch = await a.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    upload = await a.uploads.create(
        bytes=6, filename="scan.pdf", mime_type="application/pdf", purpose="assistants"
    )
    now = int(time.time())
    await gw.metering.upsert_license(
        subscription_id="sub_other",
        practice_id="prac_other",
        lookup_key="aza_basic_monthly",
        period_start=now - 3600,
        period_end=now + 86_400 * 20,
    )
    b = gw.client(key=await gw.metering.create_key("prac_other"))
    mine = await b.files.create(file=("own.jsonl", b"{}\n"), purpose="batch")
    assert [f.id async for f in b.files.list()] == [mine.id]
    assert [x.id async for x in b.batches.list()] == []
    for attempt in (
        b.files.retrieve(uploaded.id),
        b.files.content(uploaded.id),
        b.files.delete(uploaded.id),
        b.batches.retrieve(batch.id),
        b.batches.cancel(batch.id),
        b.uploads.parts.create(upload.id, data=b"abcdef"),
        b.uploads.cancel(upload.id),
        b.uploads.complete(upload.id, part_ids=["part_x"]),
    ):
        with pytest.raises(openai.NotFoundError):
            await attempt
    with pytest.raises(openai.BadRequestError):
        await b.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert [f.id async for f in a.files.list()] == [uploaded.id]
    assert (await a.batches.retrieve(batch.id)).status in ("validating", "in_progress")
    assert (await a.files.content(uploaded.id)).read().count(b"\n") == 3
    # A's upload still completes into a file only A sees.
    part = await a.uploads.parts.create(upload.id, data=b"abcdef")
    done = await a.uploads.complete(upload.id, part_ids=[part.id])
    assert done.file is not None
    assert (await a.files.retrieve(done.file.id)).bytes == 6
    with pytest.raises(openai.NotFoundError):
        await b.files.retrieve(done.file.id)


async def test_an_oversized_batch_description_is_refused_unread(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """A 2 MB JSON body to POST /v1/batches: 413 in the OpenAI shape, nothing forwarded."""
    gw = fast_gateway
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as http:
        response = await http.post(
            "/batches",
            content=b'{"metadata": "' + b"x" * 2_000_000 + b'"}',
            headers={"Authorization": f"Bearer {gw.key}", "content-type": "application/json"},
        )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert fake(upstream).batches == {} and await gw.holds() == 0


async def test_the_usage_route_and_the_history_show_a_batch_as_one_entry(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """A 12-line batch (2 lines fail) beside one chat request: every grouping counts it as
    one request with its cost in the sums; `batches` and the history list it once with its
    line counts; the CSV keeps one line per charged line."""
    gw = fast_gateway
    client = gw.client()
    fake(upstream).fail_lines = {"brief-3", "brief-7"}
    uploaded = await client.files.create(
        file=("letters.jsonl", jsonl(chat_line(n) for n in range(12))), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    row = await settled_row(gw, batch.id)
    await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hallo"}], max_tokens=20
    )
    events = await gw.settled(11)
    assert len(events) == 11
    single = next(e for e in events if not e["request_id"].startswith("batch:"))
    cost = expected_cost(upstream, batch.id)
    assert row["cost_micro_usd"] == cost and cost > 0
    admin = gw.client()
    for group_by in ("day", "model", "operation", "device"):
        body: Any = await admin.get(
            "/ai-credit/usage", options={"params": {"group_by": group_by}}, cast_to=object
        )
        assert body["total_requests"] == 2, group_by
        assert sum(g["batches"] for g in body["groups"]) == 1
        total = Decimal(body["total_cost_usd"]) * 1_000_000
        assert total == cost + single["estimated_cost_micro_usd"]
        [entry] = body["batches"]
        assert (entry["batch_id"], entry["status"]) == (batch.id, "completed")
        assert (entry["lines"], entry["completed_lines"], entry["failed_lines"]) == (12, 10, 2)
        assert entry["cost_micro_usd"] == cost
        assert Decimal(entry["cost_usd"]) * 1_000_000 == cost
        assert entry["input_tokens"] == sum(
            e["input_tokens"] for e in events if e["request_id"].startswith("batch:")
        )
    by_operation: Any = await admin.get(
        "/ai-credit/usage", options={"params": {"group_by": "operation"}}, cast_to=object
    )
    [chat] = by_operation["groups"]  # the batch's lines and the request: chat, 2 requests
    assert (chat["key"], chat["requests"], chat["batches"]) == ("chat", 2, 1)
    report = UsageReport(gw.db)
    for filters, found in (
        (EventFilters(model=MODEL), 1),
        (EventFilters(model="gpt-4o"), 0),
        (EventFilters(operation="chat"), 1),
        (EventFilters(operation="embedding"), 0),
        (EventFilters(operation="no-such-operation"), 0),
        (EventFilters(device="desk-9"), 0),
    ):
        shown = await report.batches(gw.practice, start=0, end=2**40, limit=10, filters=filters)
        assert len(shown) == found, filters
    history: Any = await admin.get("/ai-credit/history", cast_to=object)
    [entry] = history["batches"]
    assert (entry["batch_id"], entry["lines"], entry["completed_lines"]) == (batch.id, 12, 10)
    assert entry["failed_lines"] == 2 and entry["cost_micro_usd"] == cost
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as http:
        answer = await http.get(
            "/ai-credit/usage",
            params={"format": "csv"},
            headers={"Authorization": f"Bearer {gw.key}"},
        )
    assert answer.status_code == 200
    lines = answer.text.splitlines()
    assert len(lines) == 1 + 11
    assert sum(f"batch:{batch.id}:" in line for line in lines) == 10


async def test_a_running_batch_is_one_entry_holding_its_estimate(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """While it runs: one entry, state in_progress, nothing charged yet, its estimate held."""
    gw = fast_gateway
    client = gw.client()
    fake(upstream).lines_per_poll = 0
    uploaded = await client.files.create(
        file=("letters.jsonl", jsonl(chat_line(n) for n in range(5))), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def running() -> Any:
        body: Any = await client.get("/ai-credit/usage", cast_to=object)
        entries = body["batches"]
        return entries if entries and entries[0]["status"] == "in_progress" else None

    [entry] = await until(running)
    row = await batch_row(gw, batch.id)
    assert row is not None
    assert entry["batch_id"] == batch.id and entry["lines"] == 5
    assert entry["cost_micro_usd"] == 0 and entry["settled_at"] is None
    assert entry["estimate_micro_usd"] == row["estimate_micro_usd"] > 0
    body: Any = await client.get("/ai-credit/usage", cast_to=object)
    assert body["total_requests"] == 0  # nothing charged yet


async def intents_open(gw: Gateway) -> int:
    async with gw.db.read() as conn:
        value = await conn.fetchval(
            "SELECT COUNT(*) FROM aza_upstream_jobs WHERE kind = 'batch-intent' AND state = 'open'"
        )
    return int(value)


async def test_a_batch_carries_its_intent_in_metadata_and_keeps_the_clients(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """The client's metadata reaches the upstream with the gateway's intent id beside it;
    once the upstream answered, the intent is closed and the batch followed."""
    gw = fast_gateway
    client = gw.client()
    fake(upstream).lines_per_poll = 0  # runs until told
    uploaded = await client.files.create(
        file=("letters.jsonl", jsonl(chat_line(n) for n in range(3))), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"praxis": "Befunde Dienstag"},
    )
    metadata = fake(upstream).batches[batch.id]["metadata"]
    assert metadata["praxis"] == "Befunde Dienstag"
    assert metadata["aza_intent"].startswith("batch_intent_")
    row = await batch_row(gw, batch.id)
    assert row is not None and row["intent_id"] == metadata["aza_intent"]
    assert await intents_open(gw) == 0
    async with gw.db.read() as conn:
        expires = await conn.fetchval(
            "SELECT expires_at FROM ai_budget_holds WHERE hold_id = ?", row["hold_id"]
        )
    # Placed for a request's life, kept for the batch's once its intent was written.
    assert expires > time.time() + 24 * 3600
    fake(upstream).lines_per_poll = None
    await settled_row(gw, batch.id)
    assert await gw.holds() == 0


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ({f"k{n}": "v" for n in range(16)}, "at most 15 pairs"),
        ({"praxis": 7}, "string values"),
    ],
)
async def test_metadata_without_room_for_the_intent_is_a_400(
    fast_gateway: Gateway, upstream: Upstream, metadata: dict[str, Any], says: str
) -> None:
    """16 pairs (OpenAI's most) leave no room for the gateway's; a value that is not a
    string is refused too: 400 naming metadata, nothing held or forwarded."""
    gw = fast_gateway
    client = gw.client()
    uploaded = await client.files.create(
        file=("letters.jsonl", jsonl(chat_line(n) for n in range(2))), purpose="batch"
    )
    with pytest.raises(openai.BadRequestError) as refused:
        await client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=metadata,
        )
    error = refused.value.response.json()["error"]
    assert error["param"] == "metadata" and says in error["message"]
    assert fake(upstream).creates_received == 0 and await gw.holds() == 0


async def test_a_batch_made_but_answered_too_late_is_found_and_charged_once(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """The upstream makes the batch but holds its answer past the gateway's wait (504 to the
    client): after the intent's grace its follower finds the batch by its metadata, follows
    it and charges each line once; nothing stays held."""
    async with start_gateway(upstream_timeout_seconds=2.0, **FAST) as gw:
        client = gw.client()
        gate = asyncio.Event()
        fake(upstream).create_gate = gate
        uploaded = await client.files.create(
            file=("letters.jsonl", jsonl(chat_line(n) for n in range(6))), purpose="batch"
        )
        try:
            with pytest.raises(openai.APIStatusError) as late:
                await client.batches.create(
                    input_file_id=uploaded.id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                )
            assert late.value.status_code == 504
            [batch_id] = list(fake(upstream).batches)
            row = await settled_row(gw, batch_id)
        finally:
            gate.set()
        assert fake(upstream).lists >= 1
        events = await gw.events()
        assert len(events) == 6 and row["cost_micro_usd"] == expected_cost(upstream, batch_id)
        assert row["status"] == "completed" and row["intent_id"]
        assert await gw.holds() == 0 and await intents_open(gw) == 0
        assert (await client.batches.retrieve(batch_id)).id == batch_id


async def test_a_batch_the_upstream_never_made_gives_its_hold_back(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """The upstream fails (500) without making it: the client gets the 500 at once, the
    intent keeps the hold (a 5xx may have made it), and once its grace is over and the
    upstream lists no batch with its id, the hold is released and nothing stays."""
    async with start_gateway(upstream_timeout_seconds=1.0, **FAST) as gw:
        client = gw.client()
        fake(upstream).create_lost = True
        uploaded = await client.files.create(
            file=("letters.jsonl", jsonl(chat_line(n) for n in range(4))), purpose="batch"
        )
        with pytest.raises(openai.InternalServerError):
            await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )

        async def released() -> bool:
            return fake(upstream).lists >= 1 and await gw.holds() == 0

        await until(released)
        assert fake(upstream).batches == {}
        async with gw.db.read() as conn:
            assert await conn.fetchval("SELECT COUNT(*) FROM aza_batches") == 0
        assert await gw.events() == [] and await intents_open(gw) == 0


async def test_an_upstream_refusal_releases_the_intent_at_once(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """The upstream refuses it (400) and made nothing: the client gets the upstream's
    answer, nothing stays held."""
    gw = fast_gateway
    client = gw.client()
    fake(upstream).refuse_creates = True
    uploaded = await client.files.create(
        file=("letters.jsonl", jsonl(chat_line(n) for n in range(2))), purpose="batch"
    )
    with pytest.raises(openai.BadRequestError) as refused:
        await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert "cannot be created now" in refused.value.response.json()["error"]["message"]
    assert await gw.holds() == 0 and await intents_open(gw) == 0
    async with gw.db.read() as conn:
        assert await conn.fetchval("SELECT COUNT(*) FROM aza_batches") == 0


async def test_a_batch_over_the_keys_monthly_cap_is_refused_before_the_upstream(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """A client key capped below the batch's estimate: the cap's 429 (KEY_SPENDING_CAP_REACHED,
    message_user), no batch upstream, no budget or cap hold left; the admin key (no cap)
    may run it."""
    from tests.limits.test_limits import prefix_of, put_limits

    gw = fast_gateway
    answer = await put_limits(
        gw, f"/v1/ai-credit/keys/{prefix_of(gw.client_key)}/limits", {"monthly_cap_usd": "0.0001"}
    )
    assert answer.status_code == 200, answer.text
    capped = gw.client(key=gw.client_key)
    uploaded = await capped.files.create(
        file=("letters.jsonl", jsonl(chat_line(n) for n in range(50))), purpose="batch"
    )
    with pytest.raises(openai.RateLimitError) as refused:
        await capped.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    body = refused.value.response.json()
    assert body["error_code"] == "KEY_SPENDING_CAP_REACHED" and body["message_user"]
    assert body["error"]["type"] == "insufficient_quota"
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert fake(upstream).creates_received == 0
    assert await gw.holds() == 0
    async with gw.db.read() as conn:
        assert await conn.fetchval("SELECT COUNT(*) FROM ai_limit_holds") == 0


async def test_a_capped_key_and_device_hold_a_batch_and_are_charged_its_cost(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """A key and a device with caps that fit: the estimate is held on both while the batch
    runs (kept alive by the follower), then replaced by the lines' cost in each one's spend."""
    from tests.limits.test_limits import prefix_of, put_limits

    gw = fast_gateway
    prefix = prefix_of(gw.client_key)
    for path in (f"/v1/ai-credit/keys/{prefix}/limits", "/v1/ai-credit/devices/nacht-pc/limits"):
        answer = await put_limits(gw, path, {"monthly_cap_usd": "5.00"})
        assert answer.status_code == 200, answer.text
    fake(upstream).lines_per_poll = 0
    client = gw.client(key=gw.client_key, default_headers={"X-Device-Id": "nacht-pc"})
    uploaded = await client.files.create(
        file=("letters.jsonl", jsonl(chat_line(n) for n in range(20))), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    row = await batch_row(gw, batch.id)
    assert row is not None
    assert (row["cap_key"], row["cap_device"]) == (prefix, "nacht-pc")

    async def durable() -> list[Any]:
        async with gw.db.read() as conn:
            return list(
                await conn.fetchall(
                    "SELECT scope, subject, amount_micro_usd FROM ai_limit_holds "
                    "WHERE hold_id = ? ORDER BY scope",
                    row["cap_hold_id"],
                )
            )

    held = await durable()
    assert [(h["scope"], h["subject"]) for h in held] == [("device", "nacht-pc"), ("key", prefix)]
    assert all(int(h["amount_micro_usd"]) == row["estimate_micro_usd"] for h in held)
    fake(upstream).lines_per_poll = None
    settled = await settled_row(gw, batch.id)
    cost = expected_cost(upstream, batch.id)
    assert settled["cost_micro_usd"] == cost > 0
    assert await durable() == []
    async with gw.db.read() as conn:
        totals = await conn.fetchall(
            "SELECT scope, subject, used_micro_usd FROM ai_limit_totals ORDER BY scope"
        )
    assert [(t["scope"], t["subject"], int(t["used_micro_usd"])) for t in totals] == [
        ("device", "nacht-pc", cost),
        ("key", prefix, cost),
    ]
    events = await gw.events()
    assert {e["device_id"] for e in events} == {"nacht-pc"} and len(events) == 20


async def test_a_create_cancelled_by_a_shutdown_leaks_no_hold_and_loses_no_batch(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """The gateway stops while the upstream holds back its answer (the batch made): the
    server cancels the request; its intent keeps the hold, and the next gateway, once the
    intent's grace is over, finds the batch, charges it once and releases the hold."""
    from gateway.storage.jobs import JobStore

    gate = asyncio.Event()
    fake(upstream).create_gate = gate
    async with start_gateway(upstream_timeout_seconds=30.0, **FAST) as first:
        client = first.client(timeout=60)
        uploaded = await client.files.create(
            file=("letters.jsonl", jsonl(chat_line(n) for n in range(5))), purpose="batch"
        )
        creating = asyncio.create_task(
            client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        )
        await until(lambda: fake(upstream).creates_received == 1 or None)
    # Leaving the block stopped the server, which cancelled the request after its grace.
    with pytest.raises(openai.APIError):
        await creating
    gate.set()
    fake(upstream).create_gate = None
    [batch_id] = list(fake(upstream).batches)
    assert await first.holds() == 1
    async with first.db.read() as conn:
        intent = await conn.fetchval("SELECT intent_id FROM aza_batches WHERE status = 'creating'")
    # The intent's grace (twice the create timeout) is over: due now.
    await JobStore(first.db).wake("batch-intent", intent)
    async with start_gateway(**FAST) as second:
        row = await settled_row(second, batch_id)
        assert row["cost_micro_usd"] == expected_cost(upstream, batch_id) > 0
        assert len(await second.events()) == 5
        assert await second.holds() == 0 and await intents_open(second) == 0


async def test_an_empty_input_file_is_a_400_and_nothing_is_held(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """A batch of a file without a single request: 400 in the OpenAI shape, nothing forwarded."""
    gw = fast_gateway
    client = gw.client()
    uploaded = await client.files.create(file=("empty.jsonl", b"\n\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    error = refused.value.response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "empty_batch"
    assert "no requests" in error["message"]
    assert fake(upstream).batches == {} and await gw.holds() == 0


async def _running_batch(gw: Gateway, upstream: Upstream, lines: int) -> Any:
    client = gw.client()
    fake(upstream).lines_per_poll = 0
    uploaded = await client.files.create(
        file=("letters.jsonl", jsonl(chat_line(n) for n in range(lines))), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def running() -> bool:
        row = await batch_row(gw, batch.id)
        return row is not None and row["status"] == "in_progress"

    await until(running)
    return batch


async def test_an_expired_batch_is_charged_for_its_done_lines_and_frees_the_rest(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """The window runs out after 4 of 10 lines: 4 usage events at the batch price, the 6
    `batch_expired` lines counted failed, the hold released; both files readable."""
    gw = fast_gateway
    client = gw.client()
    batch = await _running_batch(gw, upstream, 10)
    fake(upstream).advance(batch.id, 4)
    fake(upstream).expire(batch.id)
    row = await settled_row(gw, batch.id)
    assert row["status"] == "expired"
    assert (row["completed_lines"], row["failed_lines"]) == (4, 6)
    events = await gw.events()
    assert {e["request_id"] for e in events} == {f"batch:{batch.id}:brief-{n}" for n in range(4)}
    assert sum(e["estimated_cost_micro_usd"] for e in events) == expected_cost(upstream, batch.id)
    assert row["cost_micro_usd"] == expected_cost(upstream, batch.id) > 0
    assert await gw.holds() == 0
    ended = await client.batches.retrieve(batch.id)
    assert ended.status == "expired" and ended.output_file_id and ended.error_file_id
    errors = (await client.files.content(ended.error_file_id)).read().splitlines()
    assert [json.loads(e)["error"]["code"] for e in errors] == ["batch_expired"] * 6


async def test_a_failed_batch_charges_nothing_and_frees_its_hold(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """The upstream's validation fails the batch: no usage, no hold, its errors shown."""
    gw = fast_gateway
    client = gw.client()
    batch = await _running_batch(gw, upstream, 5)
    fake(upstream).fail(batch.id)
    row = await settled_row(gw, batch.id)
    assert row["status"] == "failed" and row["cost_micro_usd"] == 0
    assert await gw.events() == [] and await gw.holds() == 0
    ended = await client.batches.retrieve(batch.id)
    assert ended.status == "failed" and ended.errors and ended.errors.data
    assert ended.output_file_id is None


async def test_lists_page_through_a_practices_own_among_many_others(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """The practice's 3 files and 3 batches, each newer one behind 120 others' (more than an
    upstream page): pages of 2 are full, `has_more`, `first_id`/`last_id` right, and the
    SDK's iteration gives all 3, newest first, none twice."""
    gw = fast_gateway
    client = gw.client()
    up = fake(upstream)
    up.lines_per_poll = 0
    files: list[str] = []
    batches: list[str] = []
    for _ in range(120):  # another practice's, older than all of this one's
        up.add_file(b"{}\n", filename="older.jsonl", purpose="batch")
    for n in range(3):
        made = await client.files.create(
            file=(f"in{n}.jsonl", jsonl(chat_line(k) for k in range(2))), purpose="batch"
        )
        files.append(made.id)
        batch = await client.batches.create(
            input_file_id=made.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        batches.append(batch.id)
        for _ in range(120):  # another practice's, made after this one's
            up.add_file(b"{}\n", filename="other.jsonl", purpose="batch")
            other = {**up.batches[batch.id], "id": up._id("batch_"), "created_at": next(up._clock)}
            up.batches[other["id"]] = other
    newest_first_files = files[::-1]
    newest_first_batches = batches[::-1]
    page = await client.files.list(limit=2, purpose="batch")
    assert [f.id for f in page.data] == newest_first_files[:2] and page.has_more
    raw = await client.get("/files", cast_to=object, options={"params": {"limit": 2}})
    assert (raw["first_id"], raw["last_id"]) == tuple(newest_first_files[:2])  # type: ignore[index]
    assert [f.id async for f in await client.files.list(limit=2)] == newest_first_files
    # A page that holds the practice's last file says there is no more (older ones are others').
    whole = await client.files.list(limit=3)
    assert [f.id for f in whole.data] == newest_first_files and not whole.has_more
    batch_page = await client.batches.list(limit=2)
    assert [b.id for b in batch_page.data] == newest_first_batches[:2] and batch_page.has_more
    assert [b.id async for b in await client.batches.list(limit=2)] == newest_first_batches
    last = await client.batches.list(limit=2, after=newest_first_batches[1])
    assert [b.id for b in last.data] == newest_first_batches[2:] and not last.has_more
    # More than the upstream lists at once (100 batches): the gateway pages it through.
    many = await client.batches.list(limit=150)
    assert [b.id for b in many.data] == newest_first_batches and not many.has_more


async def test_a_chunked_upload_past_the_limit_is_a_400_and_never_stored(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    """No content-length to refuse it by: counted as it streams, refused past the limit."""
    async with start_gateway(max_file_bytes=1000, **FAST) as gw:
        head = (
            b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
        )

        async def body() -> AsyncIterator[bytes]:
            yield head
            for _ in range(3):  # 3 MiB: past the limit and the multipart framing allowed
                yield b"x" * (1024 * 1024)
            yield b"\r\n--b--\r\n"

        async with httpx.AsyncClient(base_url=gw.base_url, timeout=30) as http:
            response = await http.post(
                "/files",
                content=body(),
                headers={
                    "Authorization": f"Bearer {gw.key}",
                    "content-type": "multipart/form-data; boundary=b",
                },
            )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "file_too_large" and error["type"] == "invalid_request_error"
        assert fake(upstream).files == {}
        assert [f async for f in gw.client().files.list()] == []


async def test_an_unknown_purpose_is_the_upstreams_400_and_owns_nothing(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    client = fast_gateway.client()
    with pytest.raises(openai.BadRequestError) as refused:
        await client.files.create(file=("a.jsonl", b"{}\n"), purpose="nonsense")  # type: ignore[arg-type]
    assert refused.value.response.json()["error"]["param"] == "purpose"
    with pytest.raises(openai.BadRequestError):
        await client.uploads.create(
            bytes=3,
            filename="a.pdf",
            mime_type="application/pdf",
            purpose="nonsense",  # type: ignore[arg-type]
        )
    async with fast_gateway.db.read() as conn:
        assert await conn.fetchval("SELECT COUNT(*) FROM aza_upstream_objects") == 0


async def test_a_batch_input_file_over_openais_200_mb_is_a_400_and_nothing_held(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """A practice's input file over 200 MB (put upstream directly, as uploading it would
    take long): the batch is a 400 naming the limit; nothing held, nothing forwarded."""
    gw = fast_gateway
    big = fake(upstream).add_file(
        b"\n" * (MAX_BATCH_FILE_BYTES + 1), filename="big.jsonl", purpose="batch"
    )
    async with gw.db.transaction() as conn:
        await conn.execute(
            "INSERT INTO aza_upstream_objects (object_id, object_type, practice_id, created_at) "
            "VALUES (?, 'file', ?, ?)",
            big["id"],
            gw.practice,
            int(time.time()),
        )
    try:
        with pytest.raises(openai.BadRequestError) as refused:
            await gw.client().batches.create(
                input_file_id=big["id"], endpoint="/v1/chat/completions", completion_window="24h"
            )
    finally:
        fake(upstream).contents.pop(big["id"])
    error = refused.value.response.json()["error"]
    assert error["code"] == "file_too_large" and str(MAX_BATCH_FILE_BYTES) in error["message"]
    assert fake(upstream).batches == {} and await gw.holds() == 0


async def test_a_file_list_without_a_limit_has_openais_default_of_10000(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """`client.files.list().data` holds all 25 files in one page, as OpenAI's would."""
    client = fast_gateway.client()
    made = [
        (await client.files.create(file=(f"f{n}.jsonl", b"{}\n"), purpose="batch")).id
        for n in range(25)
    ]
    page = await client.files.list()
    assert [f.id for f in page.data] == made[::-1] and not page.has_more


async def test_the_sdks_chunked_upload_makes_a_file_only_its_practice_sees(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """`uploads.upload_file_chunked` (create, 4 parts, complete) through the gateway: the
    file holds every byte in order, lists and reads for its practice; a cancelled upload
    takes no more parts."""
    gw = fast_gateway
    client = gw.client()
    data = bytes(range(256)) * 14  # 3,584 bytes: 4 parts of at most 1,000
    upload = await client.uploads.upload_file_chunked(
        file=data,
        filename="befund.pdf",
        mime_type="application/pdf",
        purpose="user_data",
        part_size=1000,
        bytes=len(data),
    )
    assert upload.status == "completed" and upload.file is not None
    assert len(fake(upstream).uploads[upload.id]["_parts"]) == 4
    assert (await client.files.content(upload.file.id)).read() == data
    assert [f.id async for f in client.files.list()] == [upload.file.id]
    other = await client.uploads.create(
        bytes=3, filename="x.pdf", mime_type="application/pdf", purpose="user_data"
    )
    cancelled = await client.uploads.cancel(other.id)
    assert cancelled.status == "cancelled"


async def test_a_file_downloads_byte_for_byte_whatever_the_upstream_compresses(
    fast_gateway: Gateway, upstream: Upstream
) -> None:
    """The fake compresses content for a caller that accepts gzip: the client still reads
    the file's own bytes, from the SDK and from a client that accepts no encoding."""
    gw = fast_gateway
    client = gw.client()
    data = b"".join(b"Zeile %d des Befunds\n" % n for n in range(500))
    made = await client.files.create(file=("befund.txt", data), purpose="user_data")
    assert (await client.files.content(made.id)).read() == data
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as http:
        response = await http.get(
            f"/files/{made.id}/content",
            headers={"Authorization": f"Bearer {gw.key}", "accept-encoding": "identity"},
        )
    assert response.status_code == 200 and response.content == data
