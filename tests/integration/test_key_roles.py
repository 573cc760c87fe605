"""Admin keys apart from client (device) keys, through the running gateway."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.keys import KeyRole
from gateway.settings import Secret
from gateway.storage import migrate
from gateway.storage.keys import hash_key
from gateway.storage.metering import MeteringStore
from tests.integration.conftest import Gateway, StartGateway
from tests.storage.test_migrations import sqlite_migrated_to

SERVICE_TOKEN = "svc-token-roles"

# Every route under /v1/ai-credit/ that a client key must not reach.
ADMIN_ONLY: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/ai-credit/history", None),
    ("POST", "/v1/ai-credit/topup/checkout", {"amount_chf": 30}),
    ("POST", "/v1/ai-credit/auto-topup/setup", None),
    ("GET", "/v1/ai-credit/auto-topup/settings", None),
    ("PUT", "/v1/ai-credit/auto-topup/settings", {"enabled": True}),
]


@pytest.fixture
async def gw(start_gateway: StartGateway) -> AsyncIterator[Gateway]:
    async with start_gateway(api_token=Secret(SERVICE_TOKEN)) as gateway:
        yield gateway


@pytest.fixture
async def http(gw: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gw.root, timeout=10) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_client_key_calls_openai_routes_and_reads_the_budget(gw: Gateway) -> None:
    """A client key is what a device carries: chat completions and the budget work."""
    client = gw.client(key=gw.client_key)
    answer = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hallo"}]
    )
    assert answer.choices[0].message.content
    async with httpx.AsyncClient(base_url=gw.root, timeout=10) as http:
        budget = await http.get("/v1/ai-credit/budget", headers=bearer(gw.client_key))
    assert budget.status_code == 200 and budget.json()["practice_id"] == gw.practice
    assert len(await gw.settled(1)) == 1


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ONLY)
async def test_a_client_key_is_refused_at_every_other_credit_route(
    http: httpx.AsyncClient, gw: Gateway, method: str, path: str, body: dict[str, Any] | None
) -> None:
    """403 in the OpenAI shape with code admin_key_required; the admin key passes the check."""
    refused = await http.request(method, path, headers=bearer(gw.client_key), json=body)
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "admin_key_required"
    assert error["type"] == "permission_error"
    assert error["message_user"].startswith("Dafür braucht es einen Admin-Schlüssel")
    assert set(error) >= {"message", "type", "code", "param"}
    allowed = await http.request(method, path, headers=bearer(gw.key), json=body)
    assert allowed.status_code != 403, allowed.text


async def test_nothing_changes_when_a_client_key_is_refused(
    http: httpx.AsyncClient, gw: Gateway
) -> None:
    """A refused settings change leaves the settings as they were."""
    before = (await http.get("/v1/ai-credit/auto-topup/settings", headers=bearer(gw.key))).json()
    await http.put(
        "/v1/ai-credit/auto-topup/settings",
        headers=bearer(gw.client_key),
        json={"enabled": True, "topup_amount_chf": 50},
    )
    after = (await http.get("/v1/ai-credit/auto-topup/settings", headers=bearer(gw.key))).json()
    assert after == before


async def test_admin_route_makes_keys_of_either_role_client_by_default(
    http: httpx.AsyncClient, gw: Gateway
) -> None:
    """POST /v1/admin/practices/{id}/keys takes role; none given makes a client key."""
    service = bearer(SERVICE_TOKEN)
    made = {}
    for role in (None, "client", "admin"):
        body = {} if role is None else {"role": role}
        response = await http.post(
            f"/v1/admin/practices/{gw.practice}/keys", headers=service, json=body
        )
        assert response.status_code == 201, response.text
        made[role] = response.json()
    assert [made[r]["role"] for r in (None, "client", "admin")] == ["client", "client", "admin"]
    history = "/v1/ai-credit/history"
    assert (await http.get(history, headers=bearer(made[None]["key"]))).status_code == 403
    assert (await http.get(history, headers=bearer(made["admin"]["key"]))).status_code == 200
    bad = await http.post(
        f"/v1/admin/practices/{gw.practice}/keys", headers=service, json={"role": "legacy"}
    )
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_role"
    listed = await http.get(f"/v1/admin/practices/{gw.practice}/keys", headers=service)
    roles = sorted(k["role"] for k in listed.json()["keys"])
    assert roles == ["admin", "admin", "client", "client", "client"]


async def test_a_client_key_is_refused_at_the_service_admin_routes(
    http: httpx.AsyncClient, gw: Gateway
) -> None:
    """The operators' routes stay for the service token: neither key kind passes."""
    for key in (gw.client_key, gw.key):
        response = await http.get(f"/v1/admin/practices/{gw.practice}/ledger", headers=bearer(key))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "service_token_required"


async def test_keys_from_before_the_roles_stay_admin_capable_until_narrowed(
    tmp_path: Path,
) -> None:
    """Migration 011 marks existing keys legacy: they keep every right; `role` narrows them."""
    db = await sqlite_migrated_to(tmp_path / "old.sqlite", 10)
    try:
        async with db.transaction() as conn:
            await conn.execute(
                "INSERT INTO gateway_keys (key_hash, key_prefix, practice_id, label, created_at) "
                "VALUES (?, 'aza_oldkey', 'prac_old', 'desk', ?)",
                hash_key("aza_the-old-key"),
                int(time.time()),
            )
        assert 11 in await migrate(db)
        from budget.pricing import PlanBook
        from config import CONFIG_DIR

        store = MeteringStore(db, plans=PlanBook.load(CONFIG_DIR / "plans.toml"))
        identity = await store.identify_key("aza_the-old-key")
        assert identity is not None
        assert identity.role is KeyRole.LEGACY and identity.role.admin_capable
        assert await store.set_key_role("aza_oldkey", KeyRole.CLIENT) == 1
        narrowed = await store.identify_key("aza_the-old-key")
        assert narrowed is not None and narrowed.role is KeyRole.CLIENT
        assert not narrowed.role.admin_capable
    finally:
        await db.close()
