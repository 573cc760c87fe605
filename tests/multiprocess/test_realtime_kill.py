"""A gateway OS process killed (SIGKILL) in the middle of a Realtime session, and restarted.

What completed before the kill is charged, nothing after; the hold of the
response that was running expires (a short `AZA_HOLD_TTL_SECONDS`) and is
swept; `aza-gateway verify` is clean; the restarted gateway serves the next
session. On SQLite (a database file) and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from websockets.exceptions import ConnectionClosed

from budget.operations import Operation
from budget.pricing import PriceBook
from budget.usage import Usage
from config import CONFIG_DIR
from gateway.demo.fake_upstream import FAKE_UPSTREAM_KEY, FakeUpstream
from gateway.settings import Settings
from gateway.storage import open_database
from gateway.storage.metering import MeteringStore
from tests.conftest import create_schema, drop_schema, pg_url_with_schema, skip_without_postgres
from tests.integration.conftest import serve
from tests.processes import gateway_processes

pytestmark = [pytest.mark.slow]

PRACTICE = "prac_rt_kill"
PRICES = PriceBook.load(CONFIG_DIR / "prices.toml")
AUDIO_100MS = base64.b64encode(bytes(4_800)).decode()
HOLD_TTL_SECONDS = 2


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite:///{Path(folder) / 'gateway.db'}"
        return
    skip_without_postgres()
    schema = "rtk_" + uuid.uuid4().hex[:12]
    await create_schema(schema)
    try:
        yield pg_url_with_schema(schema)
    finally:
        await drop_schema(schema)


async def until(condition: Callable[[], Awaitable[bool]], seconds: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def next_of(connection: Any, kind: str) -> Any:
    async with asyncio.timeout(10):
        while True:
            event = await connection.recv()
            if event.type == kind:
                return event


async def speak_and_respond(connection: Any) -> None:
    for _ in range(10):
        await connection.input_audio_buffer.append(audio=AUDIO_100MS)
    await connection.input_audio_buffer.commit()
    await connection.response.create()


def cost_of(done: Any) -> int:
    usage = done.response.usage
    details = usage.input_token_details
    return PRICES.cost_micros(
        Usage(
            Operation.REALTIME,
            "gpt-realtime",
            input_tokens=usage.input_tokens,
            cached_input_tokens=details.cached_tokens,
            output_tokens=usage.output_tokens,
            audio_input_tokens=details.audio_tokens,
            cached_audio_input_tokens=details.cached_tokens_details.audio_tokens,
            audio_output_tokens=usage.output_token_details.audio_tokens,
        )
    )


async def realtime_events(store: MeteringStore) -> list[tuple[str, int]]:
    async with store.db.read() as conn:
        rows = await conn.fetchall(
            "SELECT request_id, estimated_cost_micro_usd FROM ai_usage_events "
            "WHERE practice_id = ? ORDER BY id",
            PRACTICE,
        )
    return [(row[0], int(row[1])) for row in rows if str(row[0]).startswith("rt:")]


async def test_a_gateway_killed_mid_session_charges_what_completed_and_nothing_after(
    database_url: str,
) -> None:
    db = await open_database(database_url)
    store = MeteringStore(db, plans=Settings().plans)
    now = int(time.time())
    await store.upsert_license(
        subscription_id="lic_rt_kill",
        practice_id=PRACTICE,
        lookup_key="aza_basic_monthly",
        period_start=now - 3600,
        period_end=now + 86_400 * 20,
    )
    key = await store.create_key(PRACTICE)
    fake = FakeUpstream()
    realtime = fake.realtime
    env = {
        "AZA_DATABASE_URL": database_url,
        "AZA_UPSTREAM_BASE_URL": "",  # set below, once the fake serves
        "OPENAI_API_KEY": FAKE_UPSTREAM_KEY,
        "AZA_HOLD_TTL_SECONDS": str(HOLD_TTL_SECONDS),
        "AZA_GATE_LEASE_REQUESTS": "0",  # every hold a row of its own
        "AZA_LOG_LEVEL": "warning",
    }
    try:
        async with serve(fake) as upstream_root:
            env["AZA_UPSTREAM_BASE_URL"] = upstream_root + "/v1"
            with gateway_processes(1, env) as [instance]:
                client = openai.AsyncOpenAI(base_url=instance.url + "/v1", api_key=key)
                async with client.realtime.connect(model="gpt-realtime") as connection:
                    created = await next_of(connection, "session.created")
                    await speak_and_respond(connection)
                    first = await next_of(connection, "response.done")
                    await until(lambda: _events_are(store, 1))
                    # The second response runs for some 4 s: killed in its middle.
                    realtime.deltas, realtime.delta_delay = 200, 0.02
                    await speak_and_respond(connection)
                    await next_of(connection, "response.output_audio.delta")
                    assert await store.active_holds(PRACTICE) == 1  # the second's hold
                    instance.process.send_signal(signal.SIGKILL)
                    instance.process.wait(timeout=10)
                    with pytest.raises(ConnectionClosed):
                        while True:
                            await connection.recv()
                await client.close()
            # Killed: the hold is left behind, until it expires by itself.
            state = await store.state(PRACTICE)
            assert await store.active_holds(PRACTICE) == 1
            await until(lambda: _nothing_held(store), seconds=HOLD_TTL_SECONDS + 5)
            assert await store.sweep_expired_holds() == 1
            assert await store.active_holds(PRACTICE) == 0
            # Restarted: the next session goes through, charged as it completes.
            realtime.deltas, realtime.delta_delay = 3, 0.0
            with gateway_processes(1, env) as [instance]:
                client = openai.AsyncOpenAI(base_url=instance.url + "/v1", api_key=key)
                async with client.realtime.connect(model="gpt-realtime") as connection:
                    later = await next_of(connection, "session.created")
                    await speak_and_respond(connection)
                    third = await next_of(connection, "response.done")
                await client.close()
                await until(lambda: _events_are(store, 2))
                await until(lambda: _no_holds(store))
        events = await realtime_events(store)
        # The first response at its usage, the second not at all, the next session's own.
        assert events == [
            (f"rt:{created.session.id}:{first.response.id}", cost_of(first)),
            (f"rt:{later.session.id}:{third.response.id}", cost_of(third)),
        ]
        assert state.snapshot.used_micros == cost_of(first)
        verify = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "verify",
            env={**os.environ, "AZA_DATABASE_URL": database_url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(verify.communicate(), 60)
        assert verify.returncode == 0, err.decode()[-2000:]
        assert b"period totals match" in out
    finally:
        await db.close()


async def _events_are(store: MeteringStore, count: int) -> bool:
    return len(await realtime_events(store)) == count


async def _nothing_held(store: MeteringStore) -> bool:
    return (await store.state(PRACTICE)).snapshot.held_micros == 0


async def _no_holds(store: MeteringStore) -> bool:
    return await store.active_holds(PRACTICE) == 0
