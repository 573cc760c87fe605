"""Several gateway processes on one PostgreSQL ledger keep the single-instance guarantees.

Two `aza-gateway serve` OS processes share one database schema; a burst of
streamed requests from one practice is split across them against a nearly
empty budget, and one Stripe webhook is delivered to both at once. A third
test cuts the database connection of a gateway and restores it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from budget.estimate import estimate_usage
from budget.operations import Operation
from budget.request import parse_request
from budget.usage import Usage
from gateway.app import create_app
from gateway.demo.fake_upstream import FAKE_UPSTREAM_KEY, FakeUpstream
from gateway.settings import Secret, Settings
from gateway.storage import PostgresDatabase, open_database
from gateway.storage.metering import MeteringStore
from tests.conftest import (
    POSTGRES_URL,
    create_schema,
    drop_schema,
    pg_url_with_schema,
    skip_without_postgres,
)
from tests.credit.helpers import WEBHOOK_SECRET, event, sign, topup_meta
from tests.integration.conftest import serve
from tests.processes import free_port, gateway_processes

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

USD = 1_000_000
PRACTICE = "prac_multi"
SERVICE_TOKEN = "svc-multi"


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    skip_without_postgres()
    schema = "mp_" + uuid.uuid4().hex[:12]
    await create_schema(schema)
    try:
        yield pg_url_with_schema(schema)
    finally:
        await drop_schema(schema)


async def prepare_practice(
    url: str, *, leave_micros: int
) -> tuple[str, MeteringStore, PostgresDatabase]:
    """A practice with a 20 USD license of which only `leave_micros` is left, and its key."""
    db = await open_database(url)
    assert isinstance(db, PostgresDatabase)
    store = MeteringStore(db, plans=Settings().plans)
    now = int(time.time())
    await store.upsert_license(
        subscription_id="lic_multi",
        practice_id=PRACTICE,
        lookup_key="aza_basic_monthly",
        period_start=now - 3600,
        period_end=now + 86_400 * 20,
    )
    state = await store.state(PRACTICE)
    assert state.license is not None and state.period is not None
    await store.record_usage(
        state.license,
        state.period,
        Usage(operation=Operation.CHAT, model="gpt-4o"),
        cost_micros=20 * USD - leave_micros,
        request_id="pre-spend",
    )
    return await store.create_key(PRACTICE), store, db


MESSAGES = [{"role": "user", "content": "Bitte fasse den Befund kurz zusammen."}]
MAX_TOKENS = 8


def estimate_micros() -> int:
    body = (
        b'{"model":"gpt-4o","stream":true,"max_tokens":8,"messages":'
        b'[{"role":"user","content":"Bitte fasse den Befund kurz zusammen."}]}'
    )
    info, _ = parse_request(Operation.CHAT, "application/json", body)
    usage = estimate_usage(info, default_max_output_tokens=1024)
    return Settings().prices.cost_micros(usage)


async def one_stream(client: openai.AsyncOpenAI) -> bool:
    """True when the gateway admitted and completed the streamed request."""
    try:
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            stream=True,  # type: ignore[arg-type]
        )
        async for _ in stream:
            pass
        return True
    except openai.RateLimitError as exc:
        assert exc.response.json()["error"]["type"] == "insufficient_quota"
        return False


async def test_burst_across_two_processes_cannot_overspend_and_webhook_credits_once(
    pg_url: str,
) -> None:
    """60 streams over 2 processes: overspend within the estimation bound; one credit."""
    estimate = estimate_micros()
    leave = estimate * 6 + estimate // 2  # room for 6.5 estimates
    key, store, db = await prepare_practice(pg_url, leave_micros=leave)
    fake = FakeUpstream()
    try:
        async with serve(fake) as upstream_root:
            env = {
                "AZA_DATABASE_URL": pg_url,
                "AZA_DATABASE_POOL_SIZE": "5",
                "AZA_UPSTREAM_BASE_URL": upstream_root + "/v1",
                "OPENAI_API_KEY": FAKE_UPSTREAM_KEY,
                "AZA_API_TOKEN": SERVICE_TOKEN,
                "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
                "AZA_LOG_LEVEL": "warning",
            }
            with gateway_processes(2, env) as instances:
                clients = [
                    openai.AsyncOpenAI(base_url=i.url + "/v1", api_key=key, max_retries=0)
                    for i in instances
                ]
                results = await asyncio.gather(*(one_stream(clients[n % 2]) for n in range(60)))
                payload = event(
                    "payment_intent.succeeded",
                    {
                        "id": "pi_multi_1",
                        "object": "payment_intent",
                        "status": "succeeded",
                        "amount": 3000,
                        "amount_received": 3000,
                        "currency": "chf",
                        "metadata": topup_meta(practice=PRACTICE, credit="10"),
                    },
                    event_id="evt_multi_1",
                )
                async with httpx.AsyncClient(timeout=10) as http:
                    answers = await asyncio.gather(
                        *(
                            http.post(
                                i.url + "/v1/stripe/webhook",
                                content=payload,
                                headers={"Stripe-Signature": sign(payload)},
                            )
                            for i in instances
                            for _ in range(3)
                        )
                    )
                for client in clients:
                    await client.close()
        admitted = sum(results)
        async with db.read() as conn:
            events = await conn.fetchall(
                "SELECT estimated_cost_micro_usd, hold_micro_usd FROM ai_usage_events "
                "WHERE practice_id = ? AND request_id <> 'pre-spend'",
                PRACTICE,
            )
            credits = await conn.fetchall(
                "SELECT amount_internal_micro_usd FROM ai_credit_ledger WHERE practice_id = ?",
                PRACTICE,
            )
        charged = sum(int(row[0]) for row in events)
        # The bound of the single-instance gate: what was left, plus each admitted
        # request's cost above what it had reserved (its estimation error).
        estimation_error = sum(max(0, int(row[0]) - int(row[1])) for row in events)
        assert len(events) == admitted
        # Each request costs at most its estimate here, so at least the 6 whole
        # estimates that fit are admitted; far from all 60.
        assert 6 <= admitted < 60
        assert charged <= leave + estimation_error
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert sum(1 for a in answers if not a.json()["duplicate"]) == 1
        assert [int(row[0]) for row in credits] == [10 * USD]
        assert await store.active_holds() == 0
        assert list(await store.totals_mismatches()) == []
    finally:
        await db.close()


class CuttableProxy:
    """A loopback TCP forwarder to PostgreSQL that a test can cut and restore."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._links):
            writer.close()
        self._links.clear()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._links.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_database_outage_fails_closed_and_recovers_without_restart(pg_url: str) -> None:
    """With the database cut, requests get 503 in the OpenAI shape; restored, they pass again."""
    key, store, db = await prepare_practice(pg_url, leave_micros=10 * USD)
    parsed = httpx.URL(POSTGRES_URL)
    proxy = CuttableProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
    await proxy.start()
    proxied_url = pg_url.replace(f"{parsed.host}:{parsed.port or 5432}", f"127.0.0.1:{proxy.port}")
    fake = FakeUpstream()
    try:
        async with serve(fake) as upstream_root:
            settings = Settings(
                upstream_base_url=upstream_root + "/v1",
                upstream_api_key=Secret(FAKE_UPSTREAM_KEY),
                database_url=proxied_url,
                database_pool_size=2,
                auth_cache_seconds=0,
            )
            async with serve(create_app(settings)) as root:
                client = openai.AsyncOpenAI(base_url=root + "/v1", api_key=key, max_retries=0)
                ok = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
                assert ok.choices
                await proxy.cut()
                upstream_calls = fake.requests
                with pytest.raises(openai.APIStatusError) as caught:
                    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
                assert caught.value.status_code == 503
                assert caught.value.response.json()["error"]["type"] == "server_error"
                assert fake.requests == upstream_calls  # failed closed: nothing forwarded
                async with httpx.AsyncClient() as http:
                    assert (await http.get(root + "/readyz")).status_code == 503
                    assert (await http.get(root + "/healthz")).status_code == 200
                await proxy.start()
                again = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
                assert again.choices
                await client.close()
        async with db.read() as conn:
            count = await conn.fetchval(
                "SELECT COUNT(*) FROM ai_usage_events WHERE practice_id = ? "
                "AND request_id <> 'pre-spend'",
                PRACTICE,
            )
        assert count == 2
        assert await store.active_holds() == 0
    finally:
        await proxy.cut()
        await db.close()
