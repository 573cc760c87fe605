"""Usage written outside the request gate still crosses the period's alert thresholds.

A batch, or a background response, is admitted in one budget period and may
end in the next, which no gate of this gateway has seen: its usage is the
new period's first through this path, and the thresholds it crosses must be
written in the same transaction as that usage (both engines).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import openai

from budget.usage import Operation, Usage
from gateway.storage import AnyDatabase
from gateway.storage.metering import MeteringStore
from tests.integration.conftest import StartGateway, Upstream

USD = 1_000_000
BUDGET = 20 * USD  # aza_basic_monthly


async def until(check: Callable[[], Any], within: float = 15.0) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def thresholds(db: AnyDatabase, practice: str, period_start: int) -> list[int]:
    async with db.read() as conn:
        found = await conn.fetchall(
            "SELECT threshold FROM ai_alert_outbox WHERE practice_id = ? "
            "AND alert_type = 'budget.threshold_crossed' AND period_start = ? ORDER BY threshold",
            practice,
            period_start,
        )
    return [int(row["threshold"]) for row in found]


async def new_period(metering: MeteringStore, practice: str) -> int:
    """The license renews: a new period begins now (no gate has seen it)."""
    now = int(time.time())
    await metering.upsert_license(
        subscription_id="sub_top",
        practice_id=practice,
        lookup_key="aza_basic_monthly",
        status="active",
        period_start=now - 2,
        period_end=now + 86_400 * 30,
        customer_id="cus_x",
        customer_email="cli@example.test",
    )
    state = await metering.state(practice)
    assert state.period is not None and state.period.start == now - 2
    return state.period.start


async def spend_up_to(metering: MeteringStore, practice: str, micros: int) -> None:
    """Usage that no gate wrote marks for (an import, say): it crosses nothing itself."""
    state = await metering.state(practice)
    assert state.license is not None and state.period is not None
    await metering.record_usage(
        state.license,
        state.period,
        Usage(Operation.CHAT, "gpt-4o-mini"),
        cost_micros=micros,
        request_id=f"import-{micros}",
    )


async def test_a_batch_ending_in_a_new_period_crosses_its_threshold(
    start_gateway: StartGateway, upstream: Upstream, metering: MeteringStore, db: AnyDatabase
) -> None:
    files_batches = upstream.fake.files_batches
    files_batches.lines_per_poll = 0  # runs until released below
    async with start_gateway(job_poll_min_seconds=0.05, job_poll_max_seconds=0.2) as gw:
        client = gw.client()
        lines = [
            {
                "custom_id": f"brief-{n}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "gpt-4o-mini",
                    "max_tokens": 60,
                    "messages": [{"role": "user", "content": f"Befund {n} kurz."}],
                },
            }
            for n in range(3)
        ]
        uploaded = await client.files.create(
            file=("b.jsonl", b"".join(json.dumps(x).encode() + b"\n" for x in lines)),
            purpose="batch",
        )
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        await until(lambda: files_batches.batches[batch.id]["status"] == "in_progress")
        start = await new_period(metering, gw.practice)
        await spend_up_to(metering, gw.practice, BUDGET // 2 - 1)  # 1 micro-USD short of 50 %
        assert await thresholds(db, gw.practice, start) == []
        files_batches.lines_per_poll = None  # the next poll completes it

        async def settled() -> bool:
            async with db.read() as conn:
                return bool(
                    await conn.fetchval(
                        "SELECT settled_at FROM aza_batches WHERE batch_id = ?", batch.id
                    )
                )

        await until(settled)
        async with db.read() as conn:
            charged = await conn.fetchval(
                "SELECT cost_micro_usd FROM aza_batches WHERE batch_id = ?", batch.id
            )
        assert int(charged) > 0
        assert await thresholds(db, gw.practice, start) == [50]


async def test_a_background_response_ending_in_a_new_period_crosses_its_threshold(
    start_gateway: StartGateway, metering: MeteringStore, db: AnyDatabase
) -> None:
    async with start_gateway(upstream_store_allowed=True) as gw:
        client: openai.AsyncOpenAI = gw.client()
        created = await client.responses.create(
            model="gpt-4o-mini", input="Befund zusammenfassen", background=True, store=True
        )
        assert created.status == "queued"
        start = await new_period(metering, gw.practice)
        await spend_up_to(metering, gw.practice, BUDGET // 2 - 1)
        assert await thresholds(db, gw.practice, start) == []
        polled = created
        while polled.status != "completed":  # the fake finishes it on the second poll
            polled = await client.responses.retrieve(created.id)

        async def charged() -> list[dict[str, Any]]:
            return [e for e in await gw.events() if e["operation_type"] == "responses"]

        [event] = await until(charged)  # settled after the answer went out
        assert event["estimated_cost_micro_usd"] > 0
        assert await thresholds(db, gw.practice, start) == [50]


async def test_a_realtime_response_crosses_a_threshold_no_request_preceded(
    start_gateway: StartGateway, metering: MeteringStore, db: AnyDatabase
) -> None:
    """The period's usage so far came from elsewhere (no gate wrote marks); the first
    realtime response crosses 50 %: its gate writes the marks, its settle the alert."""
    from tests.integration.test_realtime import turn

    async with start_gateway() as gw:
        state = await metering.state(gw.practice)
        assert state.period is not None
        start = state.period.start
        await spend_up_to(metering, gw.practice, BUDGET // 2 - 1)
        assert await thresholds(db, gw.practice, start) == []
        async with gw.client().realtime.connect(model="gpt-realtime") as connection:
            await turn(connection)

        async def charged() -> list[dict[str, Any]]:
            return [e for e in await gw.events() if e["request_id"].startswith("rt:")]

        [event] = await until(charged)
        assert event["estimated_cost_micro_usd"] > 0
        assert await thresholds(db, gw.practice, start) == [50]
