"""Admin routes (service token only): ledgers, adjustments, licenses and keys of any practice."""

from __future__ import annotations

import time
import uuid

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from budget.license import calendar_month
from gateway.errors import GatewayError, unprocessable
from gateway.keys import KeyRole, parse_new_role
from gateway.routes.common import (
    decimal_field,
    endpoint,
    json_body,
    ok,
    service_caller,
    services_of,
)


def _practice(request: Request) -> str:
    return str(request.path_params["practice_id"])


@endpoint
async def ledger(request: Request) -> Response:
    """GET /v1/admin/practices/{id}/ledger: every entry, Stripe references masked."""
    await service_caller(request)
    credit = services_of(request).credit
    entries = await credit.admin_ledger(_practice(request))
    return ok({"ok": True, "practice_id": _practice(request), "entries": entries})


@endpoint
async def adjustment(request: Request) -> Response:
    """POST /v1/admin/practices/{id}/adjustments {"amount_usd": "5.00", "note": "…"}."""
    await service_caller(request)
    data = await json_body(request)
    amount = decimal_field(data, "amount_usd")
    assert amount is not None
    note = data.get("note")
    if not isinstance(note, str) or not note.strip():
        raise unprocessable(
            "'note' must say why the adjustment is made.", code="missing_note", param="note"
        )
    credit = services_of(request).credit
    result = await credit.adjust(
        _practice(request), amount_usd=amount, note=note.strip(), actor="service"
    )
    return ok(result, status=201)


@endpoint
async def create_license(request: Request) -> Response:
    """POST /v1/admin/practices/{id}/licenses {"plan", "subscription_id"?, "email"?}."""
    await service_caller(request)
    data = await json_body(request)
    services = services_of(request)
    plan = data.get("plan")
    if not isinstance(plan, str) or services.settings.plans.monthly_budget_micros(plan) is None:
        raise unprocessable(
            "'plan' must name a configured plan (config/plans.toml).",
            code="unknown_plan",
            param="plan",
        )
    subscription = data.get("subscription_id") or f"lic_{uuid.uuid4().hex[:16]}"
    period = calendar_month(int(time.time()))
    start = data.get("period_start", period.start)
    end = data.get("period_end", period.end)
    if not (isinstance(start, int) and isinstance(end, int) and start < end):
        raise unprocessable(
            "'period_start' must be before 'period_end' (unix seconds).",
            code="invalid_period",
            param="period_end",
        )
    await services.metering.upsert_license(
        subscription_id=str(subscription),
        practice_id=_practice(request),
        lookup_key=plan,
        status=str(data.get("status", "active")),
        period_start=start,
        period_end=end,
        customer_email=data.get("email") if isinstance(data.get("email"), str) else None,
    )
    return ok(
        {
            "ok": True,
            "practice_id": _practice(request),
            "subscription_id": subscription,
            "plan": plan,
            "period_start": start,
            "period_end": end,
        },
        status=201,
    )


@endpoint
async def create_key(request: Request) -> Response:
    """POST /v1/admin/practices/{id}/keys {"role": "admin"|"client", "label"?}: a new
    gateway key (client by default), shown this once."""
    await service_caller(request)
    data = await json_body(request)
    label = data.get("label") if isinstance(data.get("label"), str) else None
    role = parse_new_role(data.get("role", KeyRole.CLIENT.value))
    if role is None:
        raise unprocessable(
            "'role' must be 'admin' or 'client'.", code="invalid_role", param="role"
        )
    key = await services_of(request).metering.create_key(_practice(request), label=label, role=role)
    return ok(
        {"ok": True, "practice_id": _practice(request), "key": key, "role": role.value},
        status=201,
    )


@endpoint
async def list_keys(request: Request) -> Response:
    """GET /v1/admin/practices/{id}/keys: prefixes and dates, never keys or hashes."""
    await service_caller(request)
    keys = await services_of(request).metering.list_keys(_practice(request))
    return ok({"ok": True, "practice_id": _practice(request), "keys": keys})


@endpoint
async def revoke_key(request: Request) -> Response:
    """DELETE /v1/admin/keys/{prefix}: revoke a key by its shown prefix."""
    await service_caller(request)
    services = services_of(request)
    revoked = await services.metering.revoke_key(str(request.path_params["prefix"]))
    services.auth.forget()
    if not revoked:
        raise GatewayError(404, "No active key has that prefix.", code="key_not_found")
    return ok({"ok": True, "revoked": revoked})


routes: list[BaseRoute] = [
    Route("/v1/admin/practices/{practice_id}/ledger", ledger, methods=["GET"]),
    Route("/v1/admin/practices/{practice_id}/adjustments", adjustment, methods=["POST"]),
    Route("/v1/admin/practices/{practice_id}/licenses", create_license, methods=["POST"]),
    Route("/v1/admin/practices/{practice_id}/keys", create_key, methods=["POST"]),
    Route("/v1/admin/practices/{practice_id}/keys", list_keys, methods=["GET"]),
    Route("/v1/admin/keys/{prefix}", revoke_key, methods=["DELETE"]),
]
