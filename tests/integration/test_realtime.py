"""Realtime sessions through the gateway, driven by the official SDK's realtime client.

The fake upstream's `/v1/realtime` WebSocket (gateway/demo/realtime.py)
answers turn by turn; every test goes over real loopback sockets.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
import respx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from websockets.asyncio.client import connect as websockets_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from budget.pricing import PriceBook
from budget.realtime import SessionKind, SessionMeter
from budget.usage import Operation, Usage
from config import CONFIG_DIR
from gateway.app import create_app
from gateway.realtime import egress_proxy
from gateway.settings import Secret, Settings
from gateway.storage import AnyDatabase
from gateway.storage.metering import MeteringStore
from tests.credit.helpers import STRIPE_BASE, STRIPE_HTTPX_DEPRECATION, WEBHOOK_SECRET, save
from tests.integration.conftest import Gateway, StartGateway, serve, serving
from tests.integration.test_auto_topup import auto_topups, payment_intent

PRICES = PriceBook.load(CONFIG_DIR / "prices.toml")
USD = 1_000_000
# A tenth of a second of 24 kHz 16-bit mono silence, as the SDK would send it.
AUDIO_100MS = base64.b64encode(bytes(4_800)).decode()


async def until(condition: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    """Wait until `condition()` holds (checked every 20 ms), or fail after `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def next_of(connection: Any, kind: str, seconds: float = 5.0) -> Any:
    """Read events until one of `kind` arrives (within `seconds`); return it."""
    async with asyncio.timeout(seconds):
        while True:
            event = await connection.recv()
            if event.type == kind:
                return event


async def speak(connection: Any, tenths: int = 10) -> None:
    for _ in range(tenths):
        await connection.input_audio_buffer.append(audio=AUDIO_100MS)
    await connection.input_audio_buffer.commit()


async def turn(connection: Any, **response: Any) -> tuple[Any, list[str]]:
    """One spoken turn and its response: the `response.done` event and the event types seen."""
    await speak(connection)
    await connection.response.create(**({"response": response} if response else {}))
    seen: list[str] = []
    async with asyncio.timeout(5):
        while True:
            event = await connection.recv()
            seen.append(event.type)
            if event.type == "response.done":
                return event, seen


def cost_of(done: Any, model: str) -> int:
    usage = done.response.usage
    details = usage.input_token_details
    return PRICES.cost_micros(
        Usage(
            Operation.REALTIME,
            model,
            input_tokens=usage.input_tokens,
            cached_input_tokens=details.cached_tokens,
            output_tokens=usage.output_tokens,
            audio_input_tokens=details.audio_tokens,
            cached_audio_input_tokens=details.cached_tokens_details.audio_tokens,
            audio_output_tokens=usage.output_token_details.audio_tokens,
        )
    )


async def realtime_events(gateway: Gateway) -> list[dict[str, Any]]:
    return [e for e in await gateway.events() if e["request_id"].startswith("rt:")]


async def leave_available(gateway: Gateway, micros: int) -> None:
    """Record other usage so that `micros` of the practice's budget are left."""
    state = await gateway.metering.state(gateway.practice)
    assert state.license is not None and state.period is not None
    await gateway.metering.record_usage(
        state.license,
        state.period,
        Usage(Operation.CHAT, "gpt-4o-mini"),
        cost_micros=state.snapshot.available_micros - micros,
        request_id=f"elsewhere-{state.snapshot.available_micros}",
    )


async def test_a_voice_conversation_of_three_responses_is_charged_per_response(
    gateway: Gateway,
) -> None:
    """Three turns: every event relayed in order, three usage events at gpt-realtime's rates."""
    fake = gateway.fake.realtime
    async with gateway.client().realtime.connect(model="gpt-realtime") as connection:
        created = await next_of(connection, "session.created")
        dones = []
        for _ in range(3):
            done, seen = await turn(connection)
            dones.append(done)
            assert seen.count("response.output_audio.delta") == fake.deltas
            assert seen[0] == "input_audio_buffer.committed"
            assert seen.index("response.created") < seen.index("response.output_audio.delta")
    events = await gateway.settled(3)
    assert [e["request_id"] for e in events] == [
        f"rt:{created.session.id}:{done.response.id}" for done in dones
    ]
    for event, done in zip(events, dones, strict=True):
        assert event["operation_type"] == "realtime"
        assert event["model"] == "gpt-realtime"
        assert event["input_tokens"] == done.response.usage.input_tokens
        assert event["cached_input_tokens"] == done.response.usage.input_token_details.cached_tokens
        assert event["output_tokens"] == done.response.usage.output_tokens
        assert event["estimated_cost_micro_usd"] == cost_of(done, "gpt-realtime") > 0
        assert event["usage_estimated"] == 0 and event["status"] == "success"
    # Later turns read earlier ones as cached input, at the cached rates.
    assert dones[2].response.usage.input_token_details.cached_tokens > 0
    # The upstream got the upstream key, never the gateway key, and every client event.
    assert fake.last_headers["authorization"] == "Bearer sk-fake-upstream-key"
    assert fake.client_events.count("response.create") == 3
    assert fake.client_events.count("input_audio_buffer.append") == 30
    assert await gateway.holds() == 0
    assert list(await gateway.metering.totals_mismatches()) == []  # aza-gateway verify


async def test_an_image_in_the_conversation_is_charged_at_the_image_rate(
    gateway: Gateway,
) -> None:
    """gpt-realtime reads images: their tokens at its image input rate, not the text rate."""
    async with gateway.client().realtime.connect(model="gpt-realtime") as connection:
        await next_of(connection, "session.created")
        await connection.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Was zeigt das Bild?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
                ],
            }
        )
        await next_of(connection, "conversation.item.added")
        done, _ = await turn(connection)
    details = done.response.usage.input_token_details
    assert details.image_tokens > 0 and details.cached_tokens_details.image_tokens == 0
    [event] = await gateway.settled(1)
    usage = done.response.usage
    expected = PRICES.cost_micros(
        Usage(
            Operation.REALTIME,
            "gpt-realtime",
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            audio_input_tokens=details.audio_tokens,
            audio_output_tokens=usage.output_token_details.audio_tokens,
            image_input_tokens=details.image_tokens,
        )
    )
    assert event["estimated_cost_micro_usd"] == expected
    assert expected > cost_of(done, "gpt-realtime")  # the image rate is above the text rate


async def test_a_transcription_session_of_five_segments_is_charged_per_segment(
    gateway: Gateway,
) -> None:
    """intent=transcription: each committed segment held, then charged by its own usage."""
    client = gateway.client()
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        created = await next_of(connection, "session.created")
        assert created.session.type == "transcription"
        await connection.session.update(
            session={
                "type": "transcription",
                "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}},
            }
        )
        await next_of(connection, "session.updated")
        completed = []
        for tenths in (5, 10, 15, 20, 25):
            await speak(connection, tenths)
            completed.append(
                await next_of(connection, "conversation.item.input_audio_transcription.completed")
            )
    events = await gateway.settled(5)
    assert [e["request_id"] for e in events] == [
        f"rt:{created.session.id}:{done.item_id}" for done in completed
    ]
    for event, done in zip(events, completed, strict=True):
        usage = done.usage
        assert event["operation_type"] == "realtime_transcription"
        assert event["model"] == "gpt-4o-mini-transcribe"
        expected = PRICES.cost_micros(
            Usage(
                Operation.REALTIME_TRANSCRIPTION,
                "gpt-4o-mini-transcribe",
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                audio_input_tokens=usage.input_token_details.audio_tokens,
            )
        )
        assert event["estimated_cost_micro_usd"] == expected > 0
        assert (event["input_tokens"], event["output_tokens"]) == (
            usage.input_tokens,
            usage.output_tokens,
        )
    # Longer segments cost more: the fake bills 10 audio tokens a second.
    costs = [e["estimated_cost_micro_usd"] for e in events]
    assert costs == sorted(costs) and costs[0] < costs[-1]
    assert await gateway.holds() == 0
    assert list(await gateway.metering.totals_mismatches()) == []  # aza-gateway verify


async def test_a_replayed_usage_event_is_charged_once(gateway: Gateway) -> None:
    """Every response.done and transcription …completed arrives twice: one usage event each."""
    fake = gateway.fake.realtime
    fake.replay_done = True
    async with gateway.client().realtime.connect(model="gpt-realtime") as connection:
        created = await next_of(connection, "session.created")
        await connection.session.update(
            session={
                "type": "realtime",
                "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}},
            }
        )
        await next_of(connection, "session.updated")
        done, _ = await turn(connection)
        replayed = await next_of(connection, "response.done")
        assert replayed.response.id == done.response.id
        done2, _ = await turn(connection)
        await next_of(connection, "response.done")
    # Two responses and two transcriptions, each charged once, each at its own usage.
    events = await gateway.settled(4)
    ids = sorted(e["request_id"] for e in events)
    assert len(set(ids)) == 4
    assert f"rt:{created.session.id}:{done.response.id}" in ids
    assert f"rt:{created.session.id}:{done2.response.id}" in ids
    realtime = [e for e in events if e["operation_type"] == "realtime"]
    assert [e["estimated_cost_micro_usd"] for e in realtime] == [
        cost_of(d, "gpt-realtime") for d in (done, done2)
    ]
    assert len(await realtime_events(gateway)) == 4
    assert await gateway.holds() == 0
    assert list(await gateway.metering.totals_mismatches()) == []  # aza-gateway verify


async def test_money_running_out_after_the_second_response_ends_the_session(
    start_gateway: StartGateway,
) -> None:
    """The third response.create gets an insufficient_quota error event, is not forwarded, 1008."""
    # Without budget leases: a lease would (by design) admit the third
    # response on what the gate saw a moment before the money went.
    async with start_gateway(gate_lease_requests=0) as gateway:
        fake = gateway.fake.realtime
        async with gateway.client().realtime.connect(model="gpt-realtime") as connection:
            await next_of(connection, "session.created")
            await turn(connection)
            await turn(connection)
            await gateway.settled(2)
            await leave_available(gateway, 0)  # another device used the rest meanwhile
            await speak(connection)
            await connection.response.create()
            error = await next_of(connection, "error")
            with pytest.raises(ConnectionClosed) as closed:
                await connection.recv()
        await until(lambda: _no_holds(gateway))
        assert len(await realtime_events(gateway)) == 2
    raw = json.loads(error.to_json())
    assert raw["error"]["type"] == "insufficient_quota"
    assert raw["error"]["code"] == "insufficient_quota"
    assert raw["error"]["error_code"] == raw["error_code"] == "AI_BUDGET_EXHAUSTED"
    assert "KI-Budget" in raw["message_user"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert "AI_BUDGET_EXHAUSTED" in closed.value.rcvd.reason
    assert fake.client_events.count("response.create") == 2  # the third never left


async def _no_holds(gateway: Gateway) -> bool:
    return await gateway.holds() == 0


async def test_a_session_opens_only_when_its_first_response_is_affordable(
    gateway: Gateway,
) -> None:
    """Nothing left: the upgrade is answered with the HTTP 429 body; the upstream is not called."""
    await leave_available(gateway, 0)
    with pytest.raises(InvalidStatus) as refused:
        async with gateway.client().realtime.connect(model="gpt-realtime"):
            pass
    response = refused.value.response
    assert response.status_code == 429
    body = json.loads(response.body)
    assert body["error"]["code"] == "insufficient_quota"
    assert body["error_code"] == "AI_BUDGET_EXHAUSTED"
    assert gateway.fake.realtime.sessions == []
    assert await gateway.holds() == 0
    assert list(await gateway.metering.totals_mismatches()) == []  # aza-gateway verify


async def test_a_model_without_a_price_is_refused_before_the_upstream_is_called(
    gateway: Gateway,
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with gateway.client().realtime.connect(model="gpt-unknown-realtime"):
            pass
    assert refused.value.response.status_code == 400
    assert json.loads(refused.value.response.body)["error"]["code"] == "model_not_priced"
    assert gateway.fake.realtime.sessions == []


async def test_a_wrong_gateway_key_is_refused_with_401(gateway: Gateway) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with gateway.client(key="aza_wrong").realtime.connect(model="gpt-realtime"):
            pass
    assert refused.value.response.status_code == 401
    assert gateway.fake.realtime.sessions == []


async def test_an_upgrade_without_a_key_is_refused_before_the_upstream_is_called(
    gateway: Gateway,
) -> None:
    """No Authorization header, or the key in the query instead: 401 in the OpenAI shape."""
    url = gateway.root.replace("http://", "ws://") + "/v1/realtime?model=gpt-realtime"
    for target in (url, f"{url}&api_key={gateway.key}"):
        with pytest.raises(InvalidStatus) as refused:
            async with websockets_connect(target):
                pass
        assert refused.value.response.status_code == 401
        assert json.loads(refused.value.response.body)["error"]["type"] == "invalid_request_error"
    assert gateway.fake.realtime.sessions == []
    assert await gateway.holds() == 0


async def _conversation_until_refused(gateway: Gateway) -> int:
    """Turns until the gateway refuses one; returns how many responses completed."""
    done = 0
    try:
        async with gateway.client().realtime.connect(model="gpt-realtime") as connection:
            await next_of(connection, "session.created")
            while True:
                await speak(connection, 2)
                await connection.response.create(response={"max_output_tokens": 400})
                kind = ""
                while kind not in ("response.done", "error"):
                    kind = (await connection.recv()).type
                done += kind == "response.done"
    except ConnectionClosed as closed:
        assert closed.rcvd is not None and closed.rcvd.code == 1008
    except InvalidStatus as refused:
        assert refused.response.status_code == 429
    return done


async def test_two_sessions_of_one_practice_never_overspend_a_nearly_empty_budget(
    gateway: Gateway,
) -> None:
    """Two concurrent sessions, money for a few responses: both stop, at most one overspends."""
    gateway.fake.realtime.deltas = 100  # 200 audio tokens a response, half its estimate
    meter = SessionMeter(
        SessionKind.CONVERSATION,
        model="gpt-realtime",
        max_output_tokens=gateway.settings.default_max_output_tokens,
    )
    first = PRICES.cost_micros(meter.response_estimate())
    available = 2 * first + first // 2
    await leave_available(gateway, available)
    results = await asyncio.gather(
        _conversation_until_refused(gateway), _conversation_until_refused(gateway)
    )
    await until(lambda: _no_holds(gateway))
    events = await realtime_events(gateway)
    assert len(events) == sum(results) >= 2
    spent = sum(e["estimated_cost_micro_usd"] for e in events)
    # The gate admits while anything is left (after the other session's
    # holds), holding at most what is left: only the one response admitted
    # on the last scrap can cost more than that. A session refused while the
    # other's hold was larger than that response turned out leaves a rest.
    assert available // 2 < spent <= available + max(e["estimated_cost_micro_usd"] for e in events)
    state = await gateway.metering.state(gateway.practice)
    assert state.snapshot.available_micros == max(0, available - spent)


async def test_a_scrap_of_budget_is_not_taken_while_another_hold_is_in_flight(
    start_gateway: StartGateway,
) -> None:
    """Less left than a response's estimate, and another request of the practice in flight:
    the gate waits for it (realtime_drain_seconds), then refuses rather than overspend twice."""
    async with start_gateway(gate_lease_requests=0, realtime_drain_seconds=0.5) as gateway:
        fake = gateway.fake.realtime
        async with gateway.client().realtime.connect(model="gpt-realtime") as connection:
            await next_of(connection, "session.created")
            await turn(connection)
            await gateway.settled(1)
            await leave_available(gateway, 20_000)
            # Another request of the practice holds all but 1000 micro-USD.
            other = await gateway.metering.reserve(
                gateway.practice, request_id="elsewhere-in-flight", estimate_micros=19_000
            )
            assert other.hold is not None and other.hold.amount_micros == 19_000
            await speak(connection)
            started = asyncio.get_running_loop().time()
            await connection.response.create()
            error = await next_of(connection, "error")
            waited = asyncio.get_running_loop().time() - started
            with pytest.raises(ConnectionClosed) as closed:
                await connection.recv()
        assert waited >= 0.5
        assert error.error.code == "insufficient_quota"
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert fake.client_events.count("response.create") == 1  # the second never left
        # Only the other request's hold is left; once it goes, the 1000 are still there.
        await until(lambda: _holds_are(gateway, 19_000))
        await gateway.metering.release(other.hold)
        assert (await gateway.metering.state(gateway.practice)).snapshot.available_micros == 20_000
        assert len(await realtime_events(gateway)) == 1


async def _holds_are(gateway: Gateway, micros: int) -> bool:
    return (await gateway.metering.state(gateway.practice)).snapshot.held_micros == micros


async def test_an_event_the_upstream_refuses_gives_its_hold_back_at_once(
    gateway: Gateway,
) -> None:
    """A response.create while a response runs, a commit of too little audio: the upstream
    answers with an error and starts nothing, so their holds go back while the session
    goes on (they held the budget until the session's end)."""
    fake = gateway.fake.realtime
    fake.deltas, fake.delta_delay = 20, 0.02
    async with gateway.client().realtime.connect(model="gpt-realtime") as connection:
        await next_of(connection, "session.created")
        await speak(connection)
        await connection.response.create()
        await next_of(connection, "response.created")
        await connection.response.create()
        refused = await next_of(connection, "error")
        assert refused.error.code == "conversation_already_has_active_response"
        done = await next_of(connection, "response.done")
        await until(lambda: _no_holds(gateway))
        [event] = await gateway.settled(1)
        assert event["request_id"].endswith(done.response.id)
    client = gateway.client()
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        await next_of(connection, "session.created")
        await connection.input_audio_buffer.append(audio=AUDIO_100MS[:400])
        await connection.input_audio_buffer.commit()
        refused = await next_of(connection, "error")
        assert refused.error.code == "input_audio_buffer_commit_empty"
        await until(lambda: _no_holds(gateway))
        await speak(connection, 5)
        await next_of(connection, "conversation.item.input_audio_transcription.completed")
    events = await gateway.settled(2)
    assert [e["operation_type"] for e in events] == ["realtime", "realtime_transcription"]
    assert await gateway.holds() == 0
    assert list(await gateway.metering.totals_mismatches()) == []  # aza-gateway verify


async def test_a_client_that_leaves_mid_response_is_charged_what_the_upstream_reports(
    start_gateway: StartGateway,
) -> None:
    """The gateway cancels the response upstream and charges its response.done's usage."""
    async with start_gateway() as gateway:
        fake = gateway.fake.realtime
        fake.deltas, fake.delta_delay = 200, 0.01
        async with gateway.client().realtime.connect(model="gpt-realtime") as connection:
            await next_of(connection, "session.created")
            await speak(connection)
            await connection.response.create()
            await next_of(connection, "response.output_audio.delta")
        events = await gateway.settled(1)
        assert fake.cancelled == 1
    [event] = events
    assert event["usage_estimated"] == 0 and event["status"] == "partial"
    assert 0 < event["output_tokens"] < 2 * 200
    assert await gateway.holds() == 0
    assert list(await gateway.metering.totals_mismatches()) == []  # aza-gateway verify


async def test_a_response_that_never_reports_usage_is_charged_at_its_estimate(
    start_gateway: StartGateway,
) -> None:
    """No response.done even after the cancel: charged from the estimate when the session ends."""
    async with start_gateway(realtime_drain_seconds=0.2) as gateway:
        fake = gateway.fake.realtime
        fake.hang_before_done = True
        async with gateway.client().realtime.connect(model="gpt-realtime") as connection:
            await next_of(connection, "session.created")
            await speak(connection)
            await connection.response.create()
            await next_of(connection, "response.output_audio.delta")
        events = await gateway.settled(1)
    [event] = events
    assert event["usage_estimated"] == 1 and event["status"] == "partial"
    assert event["output_tokens"] == gateway.settings.default_max_output_tokens
    assert await gateway.holds() == 0
    assert list(await gateway.metering.totals_mismatches()) == []  # aza-gateway verify


async def test_an_upstream_that_dies_mid_response_ends_the_session_and_charges_the_estimate(
    gateway: Gateway,
) -> None:
    """The upstream drops after 2 deltas: the client sees 1011; the response is charged once."""
    fake = gateway.fake.realtime
    async with gateway.client().realtime.connect(model="gpt-realtime") as connection:
        await next_of(connection, "session.created")
        done, _ = await turn(connection)  # a complete one first, charged by its usage
        fake.drop_after_deltas = 2
        await speak(connection)
        await connection.response.create()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await connection.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    events = await gateway.settled(2)
    assert [e["usage_estimated"] for e in events] == [0, 1]
    assert events[0]["estimated_cost_micro_usd"] == cost_of(done, "gpt-realtime")
    assert events[1]["status"] == "partial"
    assert await gateway.holds() == 0
    assert list(await gateway.metering.totals_mismatches()) == []  # aza-gateway verify


async def test_the_beta_realtime_client_is_relayed_with_its_protocol_header(
    gateway: Gateway,
) -> None:
    """client.beta.realtime.connect sends OpenAI-Beta: realtime=v1, which the upstream gets."""
    # The beta client takes its WebSocket URL from websocket_base_url (else wss://).
    client = gateway.client(websocket_base_url=gateway.base_url.replace("http://", "ws://"))
    async with client.beta.realtime.connect(model="gpt-4o-realtime-preview") as conn:
        created = await next_of(conn, "session.created")
        assert created.session.max_response_output_tokens == "inf"  # the beta session object
        await conn.input_audio_buffer.append(audio=AUDIO_100MS)
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        seen: list[str] = []
        while not seen or seen[-1] != "response.done":
            seen.append((await conn.recv()).type)
            done = None if seen[-1] != "response.done" else seen
        assert done is not None
    # The beta protocol's event names went through unchanged.
    assert "response.audio.delta" in seen and "response.output_audio.delta" not in seen
    assert gateway.fake.realtime.last_headers.get("openai-beta") == "realtime=v1"
    [event] = await gateway.settled(1)
    assert event["model"] == "gpt-4o-realtime-preview"
    assert event["usage_estimated"] == 0 and event["estimated_cost_micro_usd"] > 0


async def test_a_beta_session_s_output_limit_sizes_the_hold_of_its_responses(
    start_gateway: StartGateway,
) -> None:
    """max_response_output_tokens (the beta name) read from session.updated: a response that
    never reports usage is charged at an estimate of that many output tokens."""
    async with start_gateway(realtime_drain_seconds=0.2) as gateway:
        gateway.fake.realtime.hang_before_done = True
        client = gateway.client(websocket_base_url=gateway.base_url.replace("http://", "ws://"))
        async with client.beta.realtime.connect(model="gpt-4o-realtime-preview") as conn:
            await next_of(conn, "session.created")
            await conn.session.update(session={"max_response_output_tokens": 77})
            updated = await next_of(conn, "session.updated")
            assert updated.session.max_response_output_tokens == 77
            await conn.input_audio_buffer.append(audio=AUDIO_100MS)
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            await next_of(conn, "response.audio.delta")
        [event] = await gateway.settled(1)
    assert event["usage_estimated"] == 1 and event["output_tokens"] == 77
    assert await gateway.holds() == 0


async def test_a_beta_transcription_session_is_charged_at_the_model_it_names(
    gateway: Gateway,
) -> None:
    """The beta protocol's transcription_session.update: an unpriced model is refused (not
    forwarded, the session goes on); a priced one is what each segment is charged at."""
    client = gateway.client(websocket_base_url=gateway.base_url.replace("http://", "ws://"))
    fake = gateway.fake.realtime
    async with client.beta.realtime.connect(
        model="gpt-4o-transcribe", extra_query={"intent": "transcription"}
    ) as conn:
        # Not among the beta SDK's typed events: read as it came.
        created = json.loads((await next_of(conn, "transcription_session.created")).to_json())
        assert created["session"]["object"] == "realtime.transcription_session"
        await conn.transcription_session.update(
            session={"input_audio_transcription": {"model": "whisper-unpriced"}}  # type: ignore[typeddict-item]
        )
        refused = await next_of(conn, "error")
        assert json.loads(refused.to_json())["error"]["code"] == "model_not_priced"
        assert "transcription_session.update" not in fake.client_events
        await conn.transcription_session.update(
            session={"input_audio_transcription": {"model": "gpt-4o-mini-transcribe"}}
        )
        await next_of(conn, "transcription_session.updated")
        completed = []
        for tenths in (10, 20):
            await speak(conn, tenths)
            completed.append(
                await next_of(conn, "conversation.item.input_audio_transcription.completed")
            )
    events = await gateway.settled(2)
    assert [e["request_id"] for e in events] == [
        f"rt:{created['session']['id']}:{done.item_id}" for done in completed
    ]
    for event, done in zip(events, completed, strict=True):
        assert event["operation_type"] == "realtime_transcription"
        assert event["model"] == "gpt-4o-mini-transcribe"
        assert event["estimated_cost_micro_usd"] == PRICES.cost_micros(
            Usage(
                Operation.REALTIME_TRANSCRIPTION,
                "gpt-4o-mini-transcribe",
                input_tokens=done.usage.input_tokens,
                output_tokens=done.usage.output_tokens,
                audio_input_tokens=done.usage.input_token_details.audio_tokens,
            )
        )
    assert await gateway.holds() == 0
    assert list(await gateway.metering.totals_mismatches()) == []  # aza-gateway verify


async def test_ephemeral_keys_are_refused_and_point_to_the_websocket_route(
    gateway: Gateway,
) -> None:
    client = gateway.client()
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await client.realtime.client_secrets.create(session={"type": "realtime"})
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "realtime_ephemeral_keys_disabled"
    assert "/v1/realtime?model=" in error["message"]
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            gateway.base_url + "/realtime/sessions",
            headers={"authorization": f"Bearer {gateway.key}"},
            json={"model": "gpt-realtime"},
        )
    assert answer.status_code == 403
    assert answer.json()["error"]["type"] == "permission_error"
    assert gateway.fake.requests == 0


async def test_webrtc_and_sip_calls_are_refused_and_point_to_the_websocket_route(
    start_gateway: StartGateway,
) -> None:
    """client.realtime.calls would put a call's audio past the gateway: 403, even with
    ephemeral keys allowed, and the upstream is never asked."""
    async with start_gateway(
        realtime_ephemeral_keys=True, realtime_session_cap_usd=Decimal("0.50")
    ) as gateway:
        client = gateway.client()
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.realtime.calls.create(sdp="v=0\r\n")
        error = refused.value.body
        assert isinstance(error, dict)
        assert error["code"] == "realtime_calls_not_relayed"
        assert "/v1/realtime?model=" in error["message"]
        with pytest.raises(openai.PermissionDeniedError):
            await client.realtime.calls.hangup("rtc_fake_1")
        assert gateway.fake.requests == 0
        assert await gateway.events() == []


async def test_ephemeral_keys_when_allowed_are_charged_at_the_session_cap(
    start_gateway: StartGateway,
) -> None:
    async with start_gateway(
        realtime_ephemeral_keys=True, realtime_session_cap_usd=Decimal("0.50")
    ) as gateway:
        secret = await gateway.client().realtime.client_secrets.create(
            session={"type": "realtime", "model": "gpt-realtime"}
        )
        assert secret.value.startswith("ek_")
        [event] = await gateway.settled(1)
    assert event["estimated_cost_micro_usd"] == USD // 2
    assert event["usage_estimated"] == 1
    assert event["model"] == "gpt-realtime"


@pytest.mark.filterwarnings(STRIPE_HTTPX_DEPRECATION)
async def test_an_auto_top_up_at_the_gate_lets_the_session_go_on_unnoticed(
    start_gateway: StartGateway, db: AnyDatabase
) -> None:
    """Money gone before the third response: the gate tops up and forwards it; no error event."""
    with respx.mock(assert_all_called=False) as stripe:
        stripe.route(host="127.0.0.1").pass_through()
        charge = stripe.post(f"{STRIPE_BASE}/v1/payment_intents").mock(side_effect=payment_intent)
        async with start_gateway(
            stripe_secret_key=Secret("sk_test_realtime"),
            stripe_api_base=STRIPE_BASE,
            stripe_webhook_secret=Secret(WEBHOOK_SECRET),
            topup_dry_run=False,
            auto_topup_enabled=True,
            gate_lease_requests=0,
        ) as gateway:
            await save(db, trigger=10, practice=gateway.practice)
            fake = gateway.fake.realtime
            async with gateway.client().realtime.connect(model="gpt-realtime") as connection:
                await next_of(connection, "session.created")
                await turn(connection)
                await turn(connection)
                await gateway.settled(2)
                await leave_available(gateway, 0)
                _, seen = await turn(connection)
            assert "error" not in seen
            assert fake.client_events.count("response.create") == 3
            assert charge.call_count == 1
            assert await auto_topups(db, gateway.practice) == [("succeeded", 10 * USD)]
            await until(lambda: _no_holds(gateway))
            assert len(await realtime_events(gateway)) == 3


# -- per-key and per-device limits (issue 18) ------------------------------------


async def put_limits(gateway: Gateway, path: str, body: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=gateway.root) as http:
        answer = await http.put(path, json=body, headers={"authorization": f"Bearer {gateway.key}"})
    assert answer.status_code == 200, answer.text


async def rows(db: AnyDatabase, sql: str, *args: Any) -> list[Any]:
    async with db.read() as conn:
        return list(await conn.fetchall(sql, *args))


async def test_a_capped_key_is_cut_off_at_its_cap_like_at_the_budget(
    gateway: Gateway, db: AnyDatabase
) -> None:
    """A client key capped at 0.095 USD: two responses (some 0.013 USD each) fit beside the
    next one's estimate (some 0.07 USD), the third does not. It gets the cap's error event
    (not the budget's), is not forwarded, and the socket closes with 1008; the key's spend
    is what its two responses cost."""
    prefix = gateway.client_key[:10]
    await put_limits(gateway, f"/v1/ai-credit/keys/{prefix}/limits", {"monthly_cap_usd": "0.095"})
    fake = gateway.fake.realtime
    fake.deltas = 100  # 200 audio tokens a response
    dones = []
    async with gateway.client(key=gateway.client_key).realtime.connect(
        model="gpt-realtime"
    ) as connection:
        await next_of(connection, "session.created")
        for _ in range(2):
            done, _ = await turn(connection)
            dones.append(done)
        await speak(connection)
        await connection.response.create()
        error = await next_of(connection, "error")
        with pytest.raises(ConnectionClosed) as closed:
            await connection.recv()
    raw = json.loads(error.to_json())
    assert raw["error"]["code"] == "insufficient_quota"
    assert raw["error_code"] == raw["error"]["error_code"] == "KEY_SPENDING_CAP_REACHED"
    assert "Ausgabenlimit" in raw["message_user"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert "KEY_SPENDING_CAP_REACHED" in closed.value.rcvd.reason
    assert fake.client_events.count("response.create") == 2
    events = await gateway.settled(2)
    costs = [cost_of(done, "gpt-realtime") for done in dones]
    assert [e["estimated_cost_micro_usd"] for e in events] == costs
    [total] = await rows(db, "SELECT used_micro_usd FROM ai_limit_totals WHERE subject = ?", prefix)
    assert int(total[0]) == sum(costs)
    await until(lambda: _no_cap_holds(db))
    assert await gateway.holds() == 0
    assert list(await gateway.metering.totals_mismatches()) == []  # aza-gateway verify


async def _no_cap_holds(db: AnyDatabase) -> bool:
    return await rows(db, "SELECT hold_id FROM ai_limit_holds") == []


async def test_a_rate_limited_key_gets_an_error_event_and_the_session_goes_on(
    start_gateway: StartGateway, db: AnyDatabase
) -> None:
    """Two responses per window: opening counts the first; the third response.create gets
    rate_limit_exceeded, is not forwarded, and the socket stays open for what follows."""
    async with start_gateway(rate_limit_window_seconds=3600.0) as gateway:
        prefix = gateway.client_key[:10]
        await put_limits(gateway, f"/v1/ai-credit/keys/{prefix}/limits", {"requests_per_minute": 2})
        fake = gateway.fake.realtime
        async with gateway.client(key=gateway.client_key).realtime.connect(
            model="gpt-realtime"
        ) as connection:
            await next_of(connection, "session.created")
            await turn(connection)
            await turn(connection)
            await speak(connection)
            await connection.response.create(event_id="evt_third")
            error = await next_of(connection, "error")
            # Still open: the upstream answers what the client sends next.
            await connection.input_audio_buffer.clear()
            await next_of(connection, "input_audio_buffer.cleared")
        raw = json.loads(error.to_json())
        assert raw["error"]["code"] == "rate_limit_exceeded"
        assert raw["error_code"] == "KEY_RATE_LIMITED"
        assert raw["error"]["event_id"] == "evt_third"
        assert "retry after" in raw["error"]["message"]
        assert fake.client_events.count("response.create") == 2
        assert len(await gateway.settled(2)) == 2
        await until(lambda: _no_holds(gateway))
        assert await rows(db, "SELECT hold_id FROM ai_limit_holds") == []


async def test_a_device_over_its_cap_cannot_open_a_session(gateway: Gateway) -> None:
    """The device's cap is below the first response's estimate: the upgrade gets the cap's
    HTTP 429; the upstream is not called and nothing stays held."""
    await put_limits(gateway, "/v1/ai-credit/devices/empfang-1/limits", {"monthly_cap_usd": "0.01"})
    client = gateway.client(key=gateway.client_key)
    with pytest.raises(InvalidStatus) as refused:
        async with client.realtime.connect(
            model="gpt-realtime", extra_headers={"X-Device-Id": "empfang-1"}
        ):
            pass
    response = refused.value.response
    assert response.status_code == 429
    assert json.loads(response.body)["error_code"] == "DEVICE_SPENDING_CAP_REACHED"
    assert gateway.fake.realtime.sessions == []
    # Another device of the same key is not limited.
    async with client.realtime.connect(
        model="gpt-realtime", extra_headers={"X-Device-Id": "labor-2"}
    ) as connection:
        await next_of(connection, "session.created")
    await until(lambda: _no_holds(gateway))


def test_the_upstream_websocket_takes_the_egress_proxy_as_https_requests_do() -> None:
    """HTTPS_PROXY for a wss:// upstream unless NO_PROXY names its host; ws:// goes direct."""
    proxied = Settings(https_proxy="http://proxy.praxis.ch:3128", no_proxy="intern.praxis.ch")
    assert egress_proxy(proxied, "wss://api.openai.com/v1/realtime") == (
        "http://proxy.praxis.ch:3128"
    )
    assert egress_proxy(proxied, "wss://llm.intern.praxis.ch/v1/realtime") is None
    assert egress_proxy(proxied, "ws://127.0.0.1:9000/v1/realtime") is None
    assert egress_proxy(Settings(), "wss://api.openai.com/v1/realtime") is None


async def test_an_ephemeral_key_cut_off_by_a_shutdown_leaves_no_hold(
    db: AnyDatabase, metering: MeteringStore, practice: str, gateway_settings: Settings
) -> None:
    """The upstream never answers the key request; the gateway shuts down and cancels it:
    the hold goes back at once (not at its expiry), nothing is charged."""
    arrived = asyncio.Event()

    async def hang(request: Request) -> Response:
        arrived.set()
        await asyncio.Event().wait()  # until the test ends it
        raise AssertionError("unreachable")

    stalled = Starlette(routes=[Route("/v1/realtime/client_secrets", hang, methods=["POST"])])
    async with serve(stalled) as upstream_root:
        settings = replace(
            gateway_settings,
            upstream_base_url=upstream_root + "/v1",
            realtime_ephemeral_keys=True,
            realtime_session_cap_usd=Decimal("0.50"),
        )
        key = await metering.create_key(practice)
        app = create_app(settings, database=db)
        async with httpx.AsyncClient(timeout=30) as http:
            async with serving(app, graceful_shutdown_seconds=0.2) as (root, _server):
                asking = asyncio.create_task(
                    http.post(
                        root + "/v1/realtime/client_secrets",
                        headers={"authorization": f"Bearer {key}"},
                        json={"session": {"type": "realtime", "model": "gpt-realtime"}},
                    )
                )
                await asyncio.wait_for(arrived.wait(), 10)
                assert await metering.active_holds(practice) == 1
            # uvicorn answers a request whose handler it cancelled with a bare 500.
            assert (await asking).status_code == 500
    await until(lambda: _no_holds_of(metering, practice))
    async with db.read() as conn:
        assert await conn.fetchval("SELECT COUNT(*) FROM ai_usage_events") == 0


async def _no_holds_of(metering: MeteringStore, practice: str) -> bool:
    return await metering.active_holds(practice) == 0


async def test_an_ephemeral_key_is_refused_to_a_key_whose_cap_it_exceeds(
    start_gateway: StartGateway, db: AnyDatabase
) -> None:
    """Keys allowed at 0.50 USD each; a client key capped at 0.40 USD gets the cap's 429,
    and the upstream is not asked; one capped at 1 USD gets its key, charged to its cap."""
    async with start_gateway(
        realtime_ephemeral_keys=True, realtime_session_cap_usd=Decimal("0.50")
    ) as gateway:
        prefix = gateway.client_key[:10]
        await put_limits(
            gateway, f"/v1/ai-credit/keys/{prefix}/limits", {"monthly_cap_usd": "0.40"}
        )
        client = gateway.client(key=gateway.client_key)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.realtime.client_secrets.create(session={"type": "realtime"})
        assert refused.value.response.json()["error_code"] == "KEY_SPENDING_CAP_REACHED"
        assert gateway.fake.requests == 0
        await put_limits(
            gateway, f"/v1/ai-credit/keys/{prefix}/limits", {"monthly_cap_usd": "1.00"}
        )
        secret = await client.realtime.client_secrets.create(session={"type": "realtime"})
        assert secret.value.startswith("ek_")
        [event] = await gateway.settled(1)
        assert event["estimated_cost_micro_usd"] == USD // 2
        [total] = await rows(
            db, "SELECT used_micro_usd FROM ai_limit_totals WHERE subject = ?", prefix
        )
        assert int(total[0]) == USD // 2
        await until(lambda: _no_cap_holds(db))


async def test_a_key_revoked_mid_session_gets_no_further_response(
    start_gateway: StartGateway,
) -> None:
    """Each response's gate looks the key up again: revoked, the next response.create gets
    the 401 as an error event, is not forwarded, and the socket closes with 1008."""
    async with start_gateway(api_token=Secret("svc-revoke")) as gateway:
        fake = gateway.fake.realtime
        async with gateway.client(key=gateway.client_key).realtime.connect(
            model="gpt-realtime"
        ) as connection:
            await next_of(connection, "session.created")
            await turn(connection)
            async with httpx.AsyncClient(base_url=gateway.root) as http:
                answer = await http.delete(
                    f"/v1/admin/keys/{gateway.client_key[:10]}",
                    headers={"authorization": "Bearer svc-revoke"},
                )
            assert answer.status_code == 200, answer.text
            await speak(connection)
            await connection.response.create()
            error = await next_of(connection, "error")
            with pytest.raises(ConnectionClosed) as closed:
                await connection.recv()
        assert error.error.code == "invalid_api_key"
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert fake.client_events.count("response.create") == 1
        assert len(await gateway.settled(1)) == 1
        await until(lambda: _no_holds(gateway))
