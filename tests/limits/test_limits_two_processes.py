"""A key's rate limits over two gateway OS processes sharing one PostgreSQL schema.

Two `aza-gateway serve` processes (their own pools, caches, rate slots)
take a burst of one key's requests split between them. The documented
tolerance (docs/operations.md, "Rate limits"): within a window the count
is exact across instances, except that slots an instance leased and did
not use were counted all the same, so fewer may pass, by at most one chunk
(a sixteenth of the limit, 16 at most) per instance; never more than the limit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from gateway.demo.fake_upstream import FAKE_UPSTREAM_KEY, FakeUpstream
from gateway.keys import KeyRole
from gateway.settings import Settings
from gateway.storage import open_database
from gateway.storage.metering import MeteringStore
from tests.conftest import create_schema, drop_schema, pg_url_with_schema, skip_without_postgres
from tests.integration.conftest import serve
from tests.processes import Instance, gateway_processes

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PRACTICE = "prac_rates"
SERVICE_TOKEN = "svc-rates"
CHAT: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hallo"}]}


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    skip_without_postgres()
    schema = "rl_" + uuid.uuid4().hex[:12]
    await create_schema(schema)
    try:
        yield pg_url_with_schema(schema)
    finally:
        await drop_schema(schema)


async def burst(instances: list[Instance], key: str, n: int) -> int:
    """`n` requests at once, alternating between the processes; how many got through."""
    clients = [
        openai.AsyncOpenAI(base_url=i.url + "/v1", api_key=key, max_retries=0) for i in instances
    ]

    async def one(i: int) -> bool:
        try:
            await clients[i % len(clients)].chat.completions.create(**CHAT)
            return True
        except openai.RateLimitError as exc:
            assert exc.response.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(exc.response.headers["retry-after"]) >= 1
            return False

    try:
        return sum(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        for client in clients:
            await client.close()


async def put_limits(instance: Instance, key: str, body: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=instance.url, timeout=10) as http:
        answer = await http.put(
            f"/v1/admin/keys/{key[:10]}/limits",
            json=body,
            headers={"authorization": f"Bearer {SERVICE_TOKEN}"},
        )
    assert answer.status_code == 200, answer.text


async def test_rpm_and_tpm_over_two_processes_stay_within_the_documented_tolerance(
    pg_url: str,
) -> None:
    db = await open_database(pg_url)
    store = MeteringStore(db, plans=Settings().plans)
    now = int(time.time())
    await store.upsert_license(
        subscription_id="lic_rates",
        practice_id=PRACTICE,
        lookup_key="aza_basic_monthly",
        period_start=now - 3600,
        period_end=now + 86_400 * 20,
    )
    exact, leased, tokens = [
        await store.create_key(PRACTICE, role=KeyRole.CLIENT) for _ in range(3)
    ]

    async def window(key: str) -> tuple[int, int]:
        async with db.read() as conn:
            row = await conn.fetchone(
                "SELECT requests, tokens FROM ai_rate_windows WHERE subject = ?", key[:10]
            )
        assert row is not None
        return int(row["requests"]), int(row["tokens"])

    try:
        async with serve(FakeUpstream()) as upstream_root:
            env = {
                "AZA_DATABASE_URL": pg_url,
                "AZA_DATABASE_POOL_SIZE": "5",
                "AZA_UPSTREAM_BASE_URL": upstream_root + "/v1",
                "OPENAI_API_KEY": FAKE_UPSTREAM_KEY,
                "AZA_API_TOKEN": SERVICE_TOKEN,
                "AZA_LOG_LEVEL": "warning",
                # One window for the whole test: it cannot turn during a burst.
                "AZA_RATE_LIMIT_WINDOW_SECONDS": "3600",
            }
            with gateway_processes(2, env) as instances:
                # 10 a minute: too few to lease slots, so the count is exact.
                await put_limits(instances[0], exact, {"requests_per_minute": 10})
                assert await burst(instances, exact, 30) == 10
                requests, counted = await window(exact)
                assert requests == 10  # a refused request is not counted in its window
                per_request = counted // requests

                # 160 a minute: each process leases chunks of 10 slots.
                await put_limits(instances[1], leased, {"requests_per_minute": 160})
                admitted = await burst(instances, leased, 220)
                print(f"rpm 160 over two processes: {admitted} of 220 admitted")
                assert 160 - 2 * 10 <= admitted <= 160
                assert (await window(leased))[0] <= 160

                # Tokens for five requests: five get through, over both processes.
                await put_limits(instances[0], tokens, {"tokens_per_minute": 5 * per_request})
                assert await burst(instances, tokens, 20) == 5
                assert (await window(tokens))[1] <= 5 * per_request
    finally:
        await db.close()
