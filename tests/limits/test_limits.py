"""Per-key and per-device limits end to end: caps under a burst, rate limits, the SDK's retry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.keys import KeyRole
from gateway.settings import Secret, Settings
from gateway.storage import AnyDatabase, open_database
from tests.integration.conftest import Gateway, StartGateway, serve

CHAT: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hallo"}]}
# About 10,000 prompt tokens of gpt-4o: some 0.025 USD a request, estimated and charged
# alike (the answer is cut at max_tokens), so a cap of 1 USD admits some 40 of 60.
DEAR: dict[str, Any] = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "Befund " * 5_700}],
    "max_tokens": 5,
}


def prefix_of(key: str) -> str:
    return key[:10]


async def put_limits(
    gateway: Gateway, path: str, body: dict[str, Any], *, key: str | None = None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gateway.root) as http:
        return await http.put(
            path, json=body, headers={"authorization": f"Bearer {key or gateway.key}"}
        )


def auth_of(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def rows(db: AnyDatabase, sql: str, *args: Any) -> list[Any]:
    async with db.read() as conn:
        return list(await conn.fetchall(sql, *args))


async def test_a_capped_key_stays_within_its_cap_in_a_burst(
    start_gateway: StartGateway, db: AnyDatabase
) -> None:
    """A client key capped at 1 USD sends 60 requests at once: what it is charged stays
    within the cap plus one request's estimation error; the others get the cap's 429."""
    async with start_gateway() as gateway:
        prefix = prefix_of(gateway.client_key)
        answer = await put_limits(
            gateway, f"/v1/ai-credit/keys/{prefix}/limits", {"monthly_cap_usd": "1.00"}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["monthly_cap_usd"] == "1.00"
        client = gateway.client(key=gateway.client_key)

        async def one() -> str:
            try:
                await client.chat.completions.create(**DEAR)
                return "ok"
            except openai.RateLimitError as exc:
                assert exc.response.headers["x-should-retry"] == "false"
                body = exc.response.json()
                assert body["error"]["type"] == "insufficient_quota"
                assert body["error_code"] == "KEY_SPENDING_CAP_REACHED"
                assert "Limit" in body["message_user"]
                return "capped"

        outcomes = await asyncio.gather(*(one() for _ in range(60)))
        admitted = outcomes.count("ok")
        events = await gateway.settled(admitted)
    assert 30 <= admitted < 60 and outcomes.count("capped") == 60 - admitted
    costs = [e["estimated_cost_micro_usd"] for e in events]
    holds = await rows(db, "SELECT hold_micro_usd FROM ai_usage_events ORDER BY id")
    error = max(max(0, cost - int(h[0])) for cost, h in zip(costs, holds, strict=True))
    assert sum(costs) <= 1_000_000 + error
    [total] = await rows(db, "SELECT used_micro_usd FROM ai_limit_totals WHERE subject = ?", prefix)
    assert int(total[0]) == sum(costs)
    assert await rows(db, "SELECT * FROM ai_limit_holds") == []


async def test_the_sdk_waits_for_retry_after_and_succeeds(start_gateway: StartGateway) -> None:
    """One request per (2 s) window: the next gets 429 rate_limit_exceeded with
    retry-after, and the SDK's own retry gets through once the window turned."""
    async with start_gateway(rate_limit_window_seconds=2.0) as gateway:
        prefix = prefix_of(gateway.client_key)
        answer = await put_limits(
            gateway, f"/v1/ai-credit/keys/{prefix}/limits", {"requests_per_minute": 1}
        )
        assert answer.json()["requests_per_minute"] == 1
        bare = gateway.client(key=gateway.client_key)  # no retries
        retrying = gateway.client(key=gateway.client_key, max_retries=3)

        async def refusals() -> float:
            async with httpx.AsyncClient(base_url=gateway.root) as http:
                metrics = (await http.get("/metrics")).text
            found = [
                line
                for line in metrics.splitlines()
                if line.startswith('aza_gateway_gate_decisions_total{decision="rate_limited"}')
            ]
            return float(found[0].split()[-1]) if found else 0.0

        # Get to the start of a window, with its one request used: refused, then admitted.
        refused_once = False
        while True:
            try:
                await bare.chat.completions.create(**CHAT)
            except openai.RateLimitError:
                refused_once = True
                await asyncio.sleep(0.05)  # polling for the window to turn
                continue
            if refused_once:
                break
        seen = await refusals()
        before = gateway.fake.requests
        # The window's one request is used: refused, then retried after retry-after.
        completion = await retrying.chat.completions.create(**CHAT)
        assert completion.choices[0].message.content
        assert gateway.fake.requests == before + 1
        assert await refusals() >= seen + 1
        # That retry used the new window's request: a client without retries sees the 429.
        with pytest.raises(openai.RateLimitError) as refused:
            await bare.chat.completions.create(**CHAT)
        response = refused.value.response
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        assert response.json()["error_code"] == "KEY_RATE_LIMITED"
        assert 1 <= int(response.headers["retry-after"]) <= 2
        assert 0 < int(response.headers["retry-after-ms"]) <= 2000
        # The admin key has no limits: never refused.
        await gateway.client().chat.completions.create(**CHAT)


async def test_device_limits_apply_to_that_device_only(start_gateway: StartGateway) -> None:
    """A device limited to one request a window is refused its second; another device of
    the same key, and requests without X-Device-Id, are not."""
    async with start_gateway(rate_limit_window_seconds=3600.0) as gateway:
        answer = await put_limits(
            gateway, "/v1/ai-credit/devices/empfang-1/limits", {"requests_per_minute": 1}
        )
        assert answer.status_code == 200 and answer.json()["device_id"] == "empfang-1"
        client = gateway.client(key=gateway.client_key)
        limited = {"extra_headers": {"X-Device-Id": "empfang-1"}}
        await client.chat.completions.create(**CHAT, **limited)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(**CHAT, **limited)
        assert refused.value.response.json()["error_code"] == "DEVICE_RATE_LIMITED"
        await client.chat.completions.create(**CHAT, extra_headers={"X-Device-Id": "labor-2"})
        await client.chat.completions.create(**CHAT)


async def test_limit_routes_check_input_and_who_asks(
    start_gateway: StartGateway, db: AnyDatabase
) -> None:
    """Bad values are refused with 422 and change nothing; null removes a limit; a client
    key cannot set limits; the service token uses the admin route; unknown prefixes 404."""
    async with start_gateway() as gateway:
        path = f"/v1/ai-credit/keys/{prefix_of(gateway.client_key)}/limits"
        ok = await put_limits(
            gateway,
            path,
            {"monthly_cap_usd": 2.5, "requests_per_minute": 60, "tokens_per_minute": 100000},
        )
        assert ok.json()["monthly_cap_usd"] == "2.50"
        for body in (
            {"monthly_cap_usd": "-1"},
            {"monthly_cap_usd": "lots"},
            {"requests_per_minute": 0},
            {"tokens_per_minute": 1.5},
            {"requests_per_minute": True},
            {"burst": 3},
        ):
            refused = await put_limits(gateway, path, body)
            assert refused.status_code == 422, body
        async with httpx.AsyncClient(base_url=gateway.root) as http:
            shown = await http.get(path, headers={"authorization": f"Bearer {gateway.key}"})
            assert shown.json()["monthly_cap_usd"] == "2.50"
            assert shown.json()["tokens_per_minute"] == 100000
            assert shown.json()["used_this_period_usd"] == "0.00"
        cleared = await put_limits(gateway, path, {"monthly_cap_usd": None})
        assert cleared.json()["monthly_cap_usd"] is None
        assert cleared.json()["requests_per_minute"] == 60
        as_client = await put_limits(
            gateway, path, {"monthly_cap_usd": "9"}, key=gateway.client_key
        )
        assert as_client.status_code == 403
        missing = await put_limits(gateway, "/v1/ai-credit/keys/aza_nokey/limits", {})
        assert missing.status_code == 404
        all_off = await put_limits(
            gateway, path, {"requests_per_minute": None, "tokens_per_minute": None}
        )
        assert all_off.json()["requests_per_minute"] is None
        assert await rows(db, "SELECT * FROM ai_spend_limits") == []


async def test_out_of_range_limits_are_refused_not_stored_or_rounded(
    start_gateway: StartGateway, db: AnyDatabase
) -> None:
    """Amounts and counts beyond what the database holds, or finer than a micro-USD, are
    a 422 in the OpenAI shape on the key and the device routes alike (not a 500, and
    "0.0000001" is not made a cap of 0); a PUT of a GET's answer is taken as it is."""
    async with start_gateway() as gateway:
        key_path = f"/v1/ai-credit/keys/{prefix_of(gateway.client_key)}/limits"
        first = {"monthly_cap_usd": "2.50", "requests_per_minute": 60, "tokens_per_minute": 1000}
        for path in (key_path, "/v1/ai-credit/devices/labor-1/limits"):
            assert (await put_limits(gateway, path, first)).status_code == 200
            for body, param in (
                ({"monthly_cap_usd": "1e30"}, "monthly_cap_usd"),
                # Fits the column, but its alert percent (cap × 80) overflowed PostgreSQL's
                # bigint in the trigger, so each charge on the key failed.
                ({"monthly_cap_usd": "200000000000"}, "monthly_cap_usd"),
                ({"monthly_cap_usd": 1e300}, "monthly_cap_usd"),
                ({"monthly_cap_usd": "1000000000.000001"}, "monthly_cap_usd"),
                ({"monthly_cap_usd": "0.0000001"}, "monthly_cap_usd"),
                ({"requests_per_minute": 10**23}, "requests_per_minute"),
                ({"tokens_per_minute": 2**63}, "tokens_per_minute"),
                ({"tokens_per_minute": 1_000_000_001}, "tokens_per_minute"),
            ):
                # With a good change beside it, which must not be stored either.
                beside = {"monthly_cap_usd": "9"} if param != "monthly_cap_usd" else {}
                refused = await put_limits(
                    gateway, path, {"requests_per_minute": 5, **beside, **body}
                )
                assert refused.status_code == 422, (path, body, refused.text)
                error = refused.json()["error"]
                assert error["type"] == "invalid_request_error", body
                assert error["code"] in ("invalid_amount", "invalid_limit"), body
                assert error["param"] == param, body
            async with httpx.AsyncClient(base_url=gateway.root) as http:
                shown = await http.get(path, headers={"authorization": f"Bearer {gateway.key}"})
            assert {name: shown.json()[name] for name in first} == first
            again = await put_limits(gateway, path, shown.json())
            assert again.status_code == 200, again.text
            largest = {"monthly_cap_usd": "1000000000", "tokens_per_minute": 1_000_000_000}
            assert (await put_limits(gateway, path, largest)).status_code == 200
            exact = await put_limits(gateway, path, {"monthly_cap_usd": "0.000001"})
            assert exact.json()["monthly_cap_usd"] == "0.000001"
        caps = await rows(
            db, "SELECT monthly_cap_micro_usd, tokens_per_minute FROM ai_spend_limits"
        )
        assert sorted(tuple(row) for row in caps) == [(1, 1_000_000_000)] * 2


@pytest.fixture
async def second_db(database_url: str) -> AsyncIterator[AnyDatabase]:
    other = await open_database(database_url, pool_size=10)
    try:
        yield other
    finally:
        await other.close()


@pytest.mark.postgres
async def test_rates_hold_over_two_instances(
    start_gateway: StartGateway,
    second_db: AnyDatabase,
    gateway_settings: Settings,
    db: AnyDatabase,
) -> None:
    """Two gateway instances (their own pools and caches, one PostgreSQL) share a key's
    windows: of 30 requests at once, exactly requests_per_minute get through; with a
    tokens_per_minute of five requests' tokens, exactly five."""
    if db.dialect != "postgresql":
        pytest.skip("several instances share one ledger on PostgreSQL only")
    settings = replace(gateway_settings, rate_limit_window_seconds=3600.0)
    async with (
        start_gateway(rate_limit_window_seconds=3600.0) as gateway,
        serve(create_app(settings, database=second_db)) as other_root,
    ):
        path = f"/v1/ai-credit/keys/{prefix_of(gateway.client_key)}/limits"
        await put_limits(gateway, path, {"requests_per_minute": 10})
        clients = [
            gateway.client(key=gateway.client_key),
            openai.AsyncOpenAI(
                base_url=other_root + "/v1", api_key=gateway.client_key, max_retries=0
            ),
        ]
        gateway.clients.append(clients[1])

        async def burst(n: int) -> int:
            async def one(i: int) -> bool:
                try:
                    await clients[i % 2].chat.completions.create(**CHAT)
                    return True
                except openai.RateLimitError:
                    return False

            return sum(await asyncio.gather(*(one(i) for i in range(n))))

        assert await burst(30) == 10
        [window] = await rows(db, "SELECT requests, tokens FROM ai_rate_windows")
        per_request = int(window[1]) // int(window[0])
        # A second key, never seen by either instance yet: tokens for five requests.
        second = await gateway.metering.create_key(gateway.practice, role=KeyRole.CLIENT)
        await put_limits(
            gateway,
            f"/v1/ai-credit/keys/{prefix_of(second)}/limits",
            {"tokens_per_minute": 5 * per_request},
        )
        clients = [
            gateway.client(key=second),
            openai.AsyncOpenAI(base_url=other_root + "/v1", api_key=second, max_retries=0),
        ]
        gateway.clients.append(clients[1])
        assert await burst(20) == 5


async def test_limits_far_from_reached_are_leased_and_still_add_up(
    start_gateway: StartGateway, db: AnyDatabase
) -> None:
    """A key far from its limits is admitted from rate slots and a cap lease (few database
    writes); once the lease closes, its spend is exactly the usage charged, no hold is left,
    and the window counted every request (plus at most one chunk of unused slots)."""
    async with start_gateway(rate_limit_window_seconds=3600.0) as gateway:
        prefix = prefix_of(gateway.client_key)
        await put_limits(
            gateway,
            f"/v1/ai-credit/keys/{prefix}/limits",
            {"monthly_cap_usd": "100", "requests_per_minute": 10_000},
        )
        client = gateway.client(key=gateway.client_key)
        for _ in range(4):
            await asyncio.gather(*(client.chat.completions.create(**CHAT) for _ in range(10)))
        events = await gateway.settled(40)

        async def spend() -> list[Any]:
            return await rows(db, "SELECT used_micro_usd FROM ai_limit_totals")

        async def written() -> bool:
            found = await spend()
            holds = await rows(db, "SELECT * FROM ai_limit_holds")
            return (
                bool(found)
                and not holds
                and int(found[0][0]) == sum(e["estimated_cost_micro_usd"] for e in events)
            )

        deadline = asyncio.get_running_loop().time() + 10
        while not await written():
            assert asyncio.get_running_loop().time() < deadline, await spend()
            await asyncio.sleep(0.05)
        [window] = await rows(db, "SELECT requests FROM ai_rate_windows")
        assert 40 <= int(window[0]) < 40 + 16


async def test_a_long_stream_keeps_its_cap_hold(
    start_gateway: StartGateway, db: AnyDatabase
) -> None:
    """A stream running for over twice hold_ttl_seconds still counts against its key's cap,
    and its cost is added to the key's total when it ends."""
    async with start_gateway(hold_ttl_seconds=1, gate_lease_requests=0) as gateway:
        prefix = prefix_of(gateway.client_key)
        # Near enough to the cap for a hold of its own (no cap lease).
        answer = await put_limits(
            gateway, f"/v1/ai-credit/keys/{prefix}/limits", {"monthly_cap_usd": "0.01"}
        )
        assert answer.status_code == 200, answer.text
        gateway.fake.chunk_delay = 0.4
        stream = await gateway.client(key=gateway.client_key).chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Bitte einen langen Brief " * 20}],
            stream=True,
        )
        started = time.monotonic()
        held_late: list[Any] | None = None
        async for _chunk in stream:
            if time.monotonic() - started > 2.5:
                held_late = await rows(
                    db,
                    "SELECT amount_micro_usd FROM ai_limit_holds WHERE subject = ? "
                    "AND expires_at > ?",
                    prefix,
                    int(time.time()),
                )
                break
        await stream.close()
        assert held_late is not None, "the stream ended before the hold TTL had passed twice"
        assert len(held_late) == 1 and int(held_late[0][0]) > 0
        [event] = await gateway.settled(1)
    [total] = await rows(db, "SELECT used_micro_usd FROM ai_limit_totals WHERE subject = ?", prefix)
    assert int(total[0]) == event["estimated_cost_micro_usd"]
    assert await rows(db, "SELECT * FROM ai_limit_holds") == []


async def test_a_background_response_settles_its_key_cap_hold_at_its_cost(
    start_gateway: StartGateway, db: AnyDatabase
) -> None:
    """A capped key's background response: its cap hold outlives the request as a durable
    hold, and when the response ends it is replaced by the response's cost in the key's
    spend; nothing is left held (both engines)."""
    async with start_gateway(upstream_store_allowed=True) as gateway:
        prefix = prefix_of(gateway.client_key)
        path = f"/v1/ai-credit/keys/{prefix}/limits"
        answer = await put_limits(gateway, path, {"monthly_cap_usd": "1.00"})
        assert answer.status_code == 200, answer.text
        client = gateway.client(key=gateway.client_key)
        created = await client.responses.create(
            model="gpt-4o-mini", input="Befund zusammenfassen", background=True, store=True
        )
        assert created.status == "queued"
        durable = f"bg:{created.id}"

        async def held() -> list[Any]:
            return await rows(
                db,
                "SELECT hold_id, amount_micro_usd FROM ai_limit_holds WHERE hold_id = ?",
                durable,
            )

        deadline = time.monotonic() + 10
        while not (holds := await held()):  # written once the answer went out
            assert time.monotonic() < deadline, "no durable cap hold"
            await asyncio.sleep(0.02)
        assert int(holds[0]["amount_micro_usd"]) > 0
        polled = created
        while polled.status != "completed":  # the fake finishes it on the second poll
            polled = await client.responses.retrieve(created.id)

        async def settled() -> list[Any]:
            return await rows(
                db,
                "SELECT estimated_cost_micro_usd FROM ai_usage_events "
                "WHERE operation_type = 'responses'",
            )

        deadline = time.monotonic() + 10
        while not (events := await settled()):
            assert time.monotonic() < deadline, "the background response was not settled"
            await asyncio.sleep(0.02)
        cost = int(events[0]["estimated_cost_micro_usd"])
        assert cost > 0
        # The request's own share went back to its lease, which closes within a second.
        while await rows(db, "SELECT hold_id FROM ai_limit_holds"):
            assert time.monotonic() < deadline + 10, "a cap hold was left"
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=gateway.root) as http:
            view = await http.get(path, headers={"authorization": f"Bearer {gateway.key}"})
        used = view.json()["used_this_period_usd"]
        totals = await rows(db, "SELECT used_micro_usd FROM ai_limit_totals")
        assert [int(t["used_micro_usd"]) for t in totals] == [cost]
        assert used == view.json()["used_this_period_usd"] != "0.00"


async def test_the_operator_sets_a_keys_limits_with_the_service_token(
    start_gateway: StartGateway, db: AnyDatabase
) -> None:
    """`/v1/admin/keys/{prefix}/limits`: the service token sets and reads any practice's key;
    a practice's admin key, or no token, is refused; bad values are a 422 and change
    nothing; a prefix no active key has is a 404; the key is then held to what was set."""
    token = "svc-limits"
    async with start_gateway(api_token=Secret(token)) as gateway:
        path = f"/v1/admin/keys/{prefix_of(gateway.client_key)}/limits"
        service = {"authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=gateway.root) as http:
            put = await http.put(
                path, json={"monthly_cap_usd": "3", "requests_per_minute": 1}, headers=service
            )
            assert put.status_code == 200, put.text
            assert put.json()["monthly_cap_usd"] == "3.00"
            shown = await http.get(path, headers=service)
            assert shown.json()["requests_per_minute"] == 1
            assert shown.json()["key_prefix"] == prefix_of(gateway.client_key)
            as_admin = await http.put(
                path, json={"requests_per_minute": None}, headers=auth_of(gateway.key)
            )
            assert as_admin.status_code == 403
            assert as_admin.json()["error"]["code"] == "service_token_required"
            assert (await http.get(path)).status_code == 401
            bad = await http.put(
                path, json={"monthly_cap_usd": "-3", "requests_per_minute": 5}, headers=service
            )
            assert bad.status_code == 422
            assert bad.json()["error"]["param"] == "monthly_cap_usd"
            unknown = await http.get("/v1/admin/keys/aza_nokey/limits", headers=service)
            assert unknown.status_code == 404
            assert unknown.json()["error"]["code"] == "key_not_found"
        stored = await rows(
            db, "SELECT monthly_cap_micro_usd, requests_per_minute FROM ai_spend_limits"
        )
        assert [tuple(row) for row in stored] == [(3_000_000, 1)]
        client = gateway.client(key=gateway.client_key)
        await client.chat.completions.create(**CHAT)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(**CHAT)
        assert refused.value.response.json()["error_code"] == "KEY_RATE_LIMITED"
