"""Background responses: held while they run, settled once at their real usage.

The fake upstream answers `background: true` with a queued response, then
`in_progress` to the next poll(s), then the completed response with usage.
Costs: gpt-4o-mini 0.15 in, 0.60 out per 1M tokens, rounded up once.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import openai
import pytest

from gateway.app import create_app
from gateway.background import JOB_KIND
from gateway.settings import Settings
from gateway.storage import AnyDatabase
from gateway.storage.jobs import JobStore
from gateway.storage.metering import MeteringStore
from tests.integration.conftest import Gateway, Upstream, serve


@pytest.fixture
async def database_url(tmp_path: Any) -> AsyncIterator[str]:
    """SQLite only: these tests meter, the storage engines are tested elsewhere."""
    yield f"sqlite:///{tmp_path / 'gateway.sqlite'}"


Start = Callable[..., AbstractAsyncContextManager[Gateway]]


@pytest.fixture
def start(
    db: AnyDatabase,
    metering: MeteringStore,
    practice: str,
    upstream: Upstream,
    gateway_settings: Settings,
) -> Start:
    """A gateway that allows stored content, polling background responses every `poll` s."""

    @asynccontextmanager
    async def run(*, poll: float = 3600.0, key: str | None = None) -> AsyncIterator[Gateway]:
        settings = replace(gateway_settings, upstream_store_allowed=True)
        app = create_app(settings, database=db, background_poll_seconds=poll)
        key = key or await metering.create_key(practice)
        async with serve(app) as root:
            gateway = Gateway(root, key, practice, metering, db, upstream.fake, settings)
            try:
                yield gateway
            finally:
                for client in gateway.clients:
                    await client.close()

    return run


async def other_practice_key(metering: MeteringStore) -> str:
    now = int(time.time())
    await metering.upsert_license(
        subscription_id="sub_other",
        practice_id="prac_other",
        lookup_key="aza_basic_monthly",
        status="active",
        period_start=now - 86_400,
        period_end=now + 86_400 * 29,
        customer_id="cus_other",
        customer_email="other@example.test",
    )
    return await metering.create_key("prac_other")


def expected_micros(usage: Any) -> int:
    return math.ceil(
        Decimal(usage.input_tokens) * Decimal("0.15")
        + Decimal(usage.output_tokens) * Decimal("0.60")
    )


async def background(gateway: Gateway, text: str) -> Any:
    response = await gateway.client().responses.create(
        model="gpt-4o-mini", input=text, background=True, store=True
    )
    assert response.status == "queued" and response.usage is None
    return response


async def _holds_are(gateway: Gateway, count: int) -> bool:
    return await gateway.holds() == count


async def until(condition: Callable[[], Any], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_client_polls_through_the_gateway(start: Start) -> None:
    """Queued: no charge, the hold kept; the finished poll settles at real usage, once."""
    async with start() as gateway:
        created = await background(gateway, "Befund zusammenfassen, bitte, ausführlich")
        # The request's hold makes way for the durable hold of the running response.
        await until(lambda: _holds_are(gateway, 1))
        assert await gateway.events() == []
        client = gateway.client()
        polled = await client.responses.retrieve(created.id)
        assert polled.status == "in_progress" and await gateway.events() == []
        polled = await client.responses.retrieve(created.id)
        assert polled.status == "completed" and polled.usage is not None
        [event] = await gateway.settled(1)
        assert event["estimated_cost_micro_usd"] == expected_micros(polled.usage)
        assert event["usage_estimated"] == 0
        assert await gateway.holds() == 0
        await client.responses.retrieve(created.id)  # a later poll charges nothing more
        assert len(await gateway.events()) == 1


async def test_other_practices_get_404(start: Start, metering: MeteringStore) -> None:
    """GET, DELETE, cancel and input_items of another practice's response: 404, not forwarded."""
    async with start() as gateway:
        created = await background(gateway, "Nur für diese Praxis")
        other = gateway.client(key=await other_practice_key(metering))
        before = gateway.fake.requests
        calls = [
            other.responses.retrieve(created.id),
            other.responses.delete(created.id),
            other.responses.cancel(created.id),
            other.responses.input_items.list(created.id),
            other.responses.retrieve("resp_never_made_here"),
        ]
        for call in calls:
            with pytest.raises(openai.NotFoundError):
                await call
        assert gateway.fake.requests == before
        items = await gateway.client().responses.input_items.list(created.id)
        assert items.data == []


async def test_gateway_polls_when_the_client_never_comes_back(start: Start) -> None:
    """Nobody polls: the gateway's follower settles it at the completed usage."""
    async with start(poll=0.05) as gateway:
        created = await background(gateway, "Niemand fragt nach")
        [event] = await gateway.settled(1, within_seconds=30)
        final = gateway.fake.stored_responses[created.id]
        usage = SimpleNamespace(**final["usage"])
        assert event["estimated_cost_micro_usd"] == expected_micros(usage)
        assert await gateway.holds() == 0


async def test_settled_after_a_restart(start: Start) -> None:
    """The job outlives the gateway that took the request: the next one settles it."""
    async with start() as first:
        created = await background(first, "Vor dem Neustart gestellt")
        key = first.key
        await until(lambda: _holds_are(first, 1))
    # Its first poll was due in an hour; let that hour pass for the job alone.
    await JobStore(first.db).wake(JOB_KIND, created.id)
    async with start(poll=0.05, key=key) as second:
        [event] = await second.settled(1, within_seconds=30)
        final = second.fake.stored_responses[created.id]
        usage = SimpleNamespace(**final["usage"])
        assert event["estimated_cost_micro_usd"] == expected_micros(usage)
        assert await second.holds() == 0


async def test_cancel_settles_what_was_used(start: Start) -> None:
    """A cancelled background response is charged the usage its final object reports."""
    async with start() as gateway:
        created = await background(gateway, "Bitte abbrechen")
        cancelled = await gateway.client().responses.cancel(created.id)
        assert cancelled.status == "cancelled" and cancelled.usage is not None
        [event] = await gateway.settled(1)
        assert event["estimated_cost_micro_usd"] == expected_micros(cancelled.usage)


async def test_background_without_store_is_refused_where_storage_is_not_allowed(
    start_gateway: Any, upstream: Upstream
) -> None:
    """`background: true` needs stored content: a 400, nothing forwarded, held or charged."""
    async with start_gateway() as gateway:
        assert not gateway.settings.upstream_store_allowed
        with pytest.raises(openai.BadRequestError) as refused:
            await gateway.client().responses.create(
                model="gpt-4o-mini", input="Brief schreiben", background=True
            )
        error = refused.value.body
        assert isinstance(error, dict)
        assert error["code"] == "store_not_allowed" and error["param"] == "background"
        assert "AZA_UPSTREAM_STORE=allow" in error["message"]
        assert upstream.fake.requests == 0
        assert await gateway.holds() == 0 and await gateway.events() == []


async def test_background_without_store_is_not_sent_store_false(start: Start) -> None:
    """Storage allowed: a background request without `store` goes up without `store: false`."""
    async with start() as gateway:
        response = await gateway.client().responses.create(
            model="gpt-4o-mini", input="Brief schreiben", background=True
        )
        assert response.status == "queued"
        sent = json.loads(gateway.fake.last_body)
        assert sent["background"] is True and "store" not in sent
