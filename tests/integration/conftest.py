"""End-to-end fixtures: the gateway and the fake upstream served over loopback HTTP.

Both run under uvicorn in the test's own event loop (a socket bound to
127.0.0.1:0, `server.started` awaited), and the client is the official
`openai` SDK. openai 3.x is built on httpx2, which respx cannot intercept, so
everything goes over real sockets. Storage-backed fixtures come from the root
conftest and run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import openai
import pytest
import uvicorn
from starlette.types import ASGIApp

from gateway.app import create_app
from gateway.demo.fake_upstream import FAKE_UPSTREAM_KEY, FakeUpstream
from gateway.keys import KeyRole
from gateway.settings import Secret, Settings
from gateway.storage import AnyDatabase
from gateway.storage.metering import MeteringStore
from tests.credit.helpers import CREDIT


@asynccontextmanager
async def serving(
    app: ASGIApp, *, graceful_shutdown_seconds: float = 3.0
) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    """Serve `app` on a free loopback port; yield its base URL and the server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="auto",
        # The Realtime route and the fake's: websockets' Sans-I/O server (its
        # legacy one would warn about deprecated modules).
        ws="websockets-sansio",
        timeout_graceful_shutdown=graceful_shutdown_seconds,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped before it started")
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[str]:
    """Serve `app` on a free loopback port; yield its base URL (no trailing slash)."""
    async with serving(app) as (url, _server):
        yield url


@dataclass
class Upstream:
    fake: FakeUpstream
    url: str  # ends in /v1, as AZA_UPSTREAM_BASE_URL does


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    fake = FakeUpstream()
    async with serve(fake) as url:
        yield Upstream(fake, url + "/v1")


@dataclass
class Gateway:
    """A running gateway with one practice, its admin key and a client key."""

    root: str  # http://127.0.0.1:PORT
    key: str  # an admin key: it may do everything
    practice: str
    metering: MeteringStore
    db: AnyDatabase
    fake: FakeUpstream
    settings: Settings
    client_key: str = ""  # a client (device) key of the same practice
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.root + "/v1"

    def client(
        self, *, key: str | None = None, max_retries: int = 0, **kw: Any
    ) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=key or self.key, max_retries=max_retries, **kw
        )
        self.clients.append(client)
        return client

    async def events(self) -> list[dict[str, Any]]:
        async with self.db.read() as conn:
            rows = await conn.fetchall(
                "SELECT * FROM ai_usage_events WHERE practice_id = ? ORDER BY id", self.practice
            )
        return [{key: row[key] for key in _EVENT_COLUMNS} for row in rows]

    async def holds(self) -> int:
        return await self.metering.active_holds()

    async def settled(self, events: int, *, within_seconds: float = 5.0) -> list[dict[str, Any]]:
        """The usage events once `events` of them exist and no hold is left."""
        deadline = asyncio.get_running_loop().time() + within_seconds
        while True:
            found = await self.events()
            if len(found) >= events and await self.holds() == 0:
                return found
            if asyncio.get_running_loop().time() > deadline:
                return found
            await asyncio.sleep(0.02)


_EVENT_COLUMNS = (
    "practice_id",
    "device_id",
    "request_id",
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

StartGateway = Callable[..., AbstractAsyncContextManager[Gateway]]


@pytest.fixture
def gateway_settings(upstream: Upstream) -> Settings:
    """Settings pointing at the fake upstream (the database is injected, not opened)."""
    return Settings(
        upstream_base_url=upstream.url,
        upstream_api_key=Secret(FAKE_UPSTREAM_KEY),
        upstream_timeout_seconds=5.0,
        database_url="sqlite:///unused-the-database-is-injected",
        credit=CREDIT,  # no VAT, as these tests' Stripe fakes expect
    )


@pytest.fixture
def start_gateway(
    db: AnyDatabase,
    metering: MeteringStore,
    practice: str,
    upstream: Upstream,
    gateway_settings: Settings,
) -> StartGateway:
    """Start a gateway on `db` with settings overrides: `async with start_gateway(**kw) as gw`."""

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Gateway]:
        settings = replace(gateway_settings, **overrides)
        app = create_app(settings, database=db)
        key = await metering.create_key(practice, role=KeyRole.ADMIN)
        client_key = await metering.create_key(practice, role=KeyRole.CLIENT)
        async with serve(app) as root:
            gateway = Gateway(
                root, key, practice, metering, db, upstream.fake, settings, client_key=client_key
            )
            try:
                yield gateway
            finally:
                for client in gateway.clients:
                    await client.close()

    return start


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> AsyncIterator[Gateway]:
    async with start_gateway() as gw:
        yield gw
