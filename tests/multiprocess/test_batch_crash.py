"""A gateway process killed (SIGKILL) between the upstream making a batch and the gateway
recording it: after a restart the batch is found upstream, followed and charged once; one
the upstream never made gives its hold back."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import openai
import pytest

from gateway.demo.fake_upstream import FAKE_UPSTREAM_KEY, FakeUpstream
from gateway.storage import PostgresDatabase
from tests.conftest import create_schema, drop_schema, pg_url_with_schema, skip_without_postgres
from tests.integration.conftest import serve
from tests.multiprocess.test_batches_two_instances import line
from tests.multiprocess.test_several_instances import PRACTICE, USD, prepare_practice
from tests.processes import gateway_processes

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

LINES = 12


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    skip_without_postgres()
    schema = "mc_" + uuid.uuid4().hex[:12]
    await create_schema(schema)
    try:
        yield pg_url_with_schema(schema)
    finally:
        await drop_schema(schema)


async def until(check: Callable[[], Awaitable[Any]], within: float = 60.0) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while not (value := await check()):
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
    return value


def environment(url: str, upstream_root: str) -> dict[str, str]:
    return {
        "AZA_DATABASE_URL": url,
        "AZA_DATABASE_POOL_SIZE": "4",
        "AZA_UPSTREAM_BASE_URL": upstream_root + "/v1",
        "OPENAI_API_KEY": FAKE_UPSTREAM_KEY,
        # The upstream's batch create is awaited 2 s at most: an intent is looked for
        # upstream some 4 s after it was made.
        "AZA_UPSTREAM_TIMEOUT_SECONDS": "2",
        "AZA_JOB_POLL_MIN_SECONDS": "0.05",
        "AZA_JOB_POLL_MAX_SECONDS": "0.2",
        "AZA_LOG_LEVEL": "warning",
    }


async def fetch(db: PostgresDatabase, sql: str, *args: Any) -> list[Any]:
    async with db.read() as conn:
        return list(await conn.fetchall(sql, *args))


async def create_and_kill(url: str, upstream_root: str, key: str, fake: FakeUpstream) -> str | None:
    """Start one gateway process, create a batch through it, and SIGKILL it while the
    upstream holds its answer back. The upstream's batch id, if it made one."""
    with gateway_processes(1, environment(url, upstream_root)) as [instance]:
        client = openai.AsyncOpenAI(base_url=instance.url + "/v1", api_key=key, max_retries=0)
        uploaded = await client.files.create(
            file=("in.jsonl", b"".join(line(n) for n in range(LINES))), purpose="batch"
        )
        creating = asyncio.create_task(
            client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        )

        async def asked() -> bool:
            return fake.files_batches.creates_received == 1

        await until(asked)
        instance.process.kill()
        instance.process.wait()
        # The held-back answer now goes to a dead connection; later creates are not held.
        gate = fake.files_batches.create_gate
        fake.files_batches.create_gate = None
        assert gate is not None
        gate.set()
        with pytest.raises(openai.APIConnectionError):
            await creating
        await client.close()
    return next(iter(fake.files_batches.batches), None)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.files_batches.create_gate = asyncio.Event()
    yield fake


async def test_a_batch_made_upstream_before_a_crash_is_found_and_charged_once(
    pg_url: str,
    fake: FakeUpstream,
) -> None:
    """Killed while the upstream holds back its answer (the batch made): the restarted
    gateway finds it by its metadata, follows it and charges each line once."""
    key, store, db = await prepare_practice(pg_url, leave_micros=10 * USD)
    try:
        async with serve(fake) as upstream_root:
            batch_id = await create_and_kill(pg_url, upstream_root, key, fake)
            assert batch_id is not None
            [intent] = await fetch(db, "SELECT batch_id, status, intent_id FROM aza_batches")
            assert (intent["status"], intent["batch_id"]) == ("creating", intent["intent_id"])
            assert await store.active_holds() == 1
            assert fake.files_batches.batches[batch_id]["metadata"] == {
                "aza_intent": intent["intent_id"]
            }
            with gateway_processes(1, environment(pg_url, upstream_root)):

                async def settled() -> list[Any]:
                    return await fetch(
                        db,
                        "SELECT * FROM aza_batches WHERE batch_id = ? AND settled_at IS NOT NULL",
                        batch_id,
                    )

                [row] = await until(settled)
        events = await fetch(
            db,
            "SELECT request_id, estimated_cost_micro_usd FROM ai_usage_events "
            "WHERE practice_id = ? AND request_id LIKE 'batch:%'",
            PRACTICE,
        )
        expected = 0
        for raw in fake.files_batches.done_lines[batch_id]:
            usage = json.loads(raw)["response"]["body"]["usage"]
            expected += math.ceil(
                usage["prompt_tokens"] * Decimal("0.075")
                + usage["completion_tokens"] * Decimal("0.30")
            )
        assert sorted(e["request_id"] for e in events) == sorted(
            f"batch:{batch_id}:c{n}" for n in range(LINES)
        )
        assert sum(int(e["estimated_cost_micro_usd"]) for e in events) == expected
        assert int(row["cost_micro_usd"]) == expected and row["status"] == "completed"
        assert await store.active_holds() == 0
        assert len(await fetch(db, "SELECT * FROM aza_batches")) == 1
        owner = await fetch(
            db, "SELECT practice_id FROM aza_upstream_objects WHERE object_id = ?", batch_id
        )
        assert [o["practice_id"] for o in owner] == [PRACTICE]
        assert list(await store.totals_mismatches()) == []
    finally:
        await db.close()


async def test_a_batch_never_made_before_a_crash_gives_its_hold_back(
    pg_url: str,
    fake: FakeUpstream,
) -> None:
    """Killed before the upstream made anything: after the restart and the intent's grace
    the upstream lists no batch with its id, and the hold is released."""
    key, store, db = await prepare_practice(pg_url, leave_micros=10 * USD)
    fake.files_batches.create_lost = True
    try:
        async with serve(fake) as upstream_root:
            assert await create_and_kill(pg_url, upstream_root, key, fake) is None
            assert await store.active_holds() == 1
            with gateway_processes(1, environment(pg_url, upstream_root)):

                async def released() -> bool:
                    return await store.active_holds() == 0

                await until(released)
            assert await fetch(db, "SELECT * FROM aza_batches") == []
            assert fake.files_batches.lists >= 1
    finally:
        await db.close()
