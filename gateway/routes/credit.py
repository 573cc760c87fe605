"""Practice routes: budget, credit history, manual top-up, card setup, auto-top-up settings.

Each acts for the caller's own practice: the one its gateway key belongs to,
or the one the service token names in X-Practice-Id. No header can reach
another practice's data. The budget is open to every key of the practice;
everything else needs an admin key (gateway/keys.py): a client key gets 403
`admin_key_required`.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from credit.service import CreditService
from gateway.errors import unprocessable
from gateway.routes.common import (
    admin_practice_of,
    decimal_field,
    endpoint,
    json_body,
    ok,
    practice_of,
    services_of,
)
from gateway.routes.usage import batch_json, report_of


def _credit(request: Request) -> CreditService:
    return services_of(request).credit


@endpoint
async def budget(request: Request) -> Response:
    """GET /v1/ai-credit/budget: the budget snapshot of the caller's practice."""
    _, practice_id = await practice_of(request)
    state = await services_of(request).metering.state(practice_id)
    lic = state.license
    payload: dict[str, Any] = {
        "ok": state.problem is None,
        "practice_id": practice_id,
        **state.snapshot.to_dict(),
        "license": None
        if lic is None
        else {
            "status": lic.status,
            "plan": lic.lookup_key,
            "period_start": state.period.start if state.period else lic.period_start,
            "period_end": state.period.end if state.period else lic.period_end,
        },
    }
    if state.problem is not None:
        payload["error_code"] = state.problem.value
    # Alerts of this period a client app can show as a banner before the hard stop.
    period_start = state.period.start if state.period else None
    payload["alerts_pending"] = await services_of(request).alerts.pending(practice_id, period_start)
    return ok(payload)


@endpoint
async def history(request: Request) -> Response:
    """GET /v1/ai-credit/history: the practice's ledger, Stripe references masked, and
    its batches (`batches`: one entry each, with line count and cost)."""
    _, practice_id = await admin_practice_of(request)
    limit = request.query_params.get("limit", "100")
    # isdigit() alone accepts "²" and other digits int() refuses.
    if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= 1000:
        raise unprocessable(
            "'limit' must be a whole number from 1 to 1000.", code="invalid_limit", param="limit"
        )
    items = await _credit(request).history(practice_id, limit=int(limit))
    # Each batch is one entry with its line counts and cost (not one per line).
    batches = await report_of(services_of(request)).batches(
        practice_id, start=0, end=2**62, limit=int(limit)
    )
    return ok({"ok": True, "items": items, "batches": [batch_json(batch) for batch in batches]})


@endpoint
async def topup_checkout(request: Request) -> Response:
    """POST /v1/ai-credit/topup/checkout {"amount_chf": 30}: a Stripe Checkout for extra credit."""
    _, practice_id = await admin_practice_of(request)
    data = await json_body(request)
    amount = decimal_field(data, "amount_chf", required=False)
    credit = _credit(request)
    state = await services_of(request).metering.state(practice_id)
    lic = state.license
    result = await credit.create_topup_checkout(
        practice_id,
        subscription_id=lic.subscription_id if lic else None,
        customer_email=lic.customer_email if lic else None,
        amount_chf=amount
        if amount is not None
        else services_of(request).settings.credit.default_topup_amount_chf,
    )
    return ok(result)


@endpoint
async def auto_topup_setup(request: Request) -> Response:
    """POST /v1/ai-credit/auto-topup/setup: a Stripe Checkout (setup mode) to save a card."""
    _, practice_id = await admin_practice_of(request)
    state = await services_of(request).metering.state(practice_id)
    email = state.license.customer_email if state.license else None
    result = await _credit(request).create_setup_checkout(practice_id, customer_email=email)
    return ok(result)


@endpoint
async def auto_topup_settings_get(request: Request) -> Response:
    """GET /v1/ai-credit/auto-topup/settings: status, never the payment method id."""
    _, practice_id = await admin_practice_of(request)
    return ok(await _credit(request).settings_status(practice_id))


@endpoint
async def auto_topup_settings_put(request: Request) -> Response:
    """PUT /v1/ai-credit/auto-topup/settings {"enabled", "topup_amount_chf", …}."""
    _, practice_id = await admin_practice_of(request)
    data = await json_body(request)
    enabled = data.get("enabled", data.get("auto_topup_enabled"))
    if enabled is not None and not isinstance(enabled, bool):
        raise unprocessable(
            "'enabled' must be true or false.", code="invalid_enabled", param="enabled"
        )
    trigger = data.get("trigger_below_percent")
    if trigger is not None and (isinstance(trigger, bool) or not isinstance(trigger, int)):
        raise unprocessable(
            "'trigger_below_percent' must be a whole number.",
            code="invalid_trigger",
            param="trigger_below_percent",
        )
    result = await _credit(request).update_settings(
        practice_id,
        enabled=enabled,
        topup_amount_chf=decimal_field(data, "topup_amount_chf", required=False),
        trigger_below_percent=trigger,
        monthly_limit_chf=decimal_field(data, "monthly_limit_chf", required=False),
    )
    return ok(result)


routes: list[BaseRoute] = [
    Route("/v1/ai-credit/budget", budget, methods=["GET"]),
    Route("/v1/ai-credit/history", history, methods=["GET"]),
    Route("/v1/ai-credit/topup/checkout", topup_checkout, methods=["POST"]),
    Route("/v1/ai-credit/auto-topup/setup", auto_topup_setup, methods=["POST"]),
    Route("/v1/ai-credit/auto-topup/settings", auto_topup_settings_get, methods=["GET"]),
    Route("/v1/ai-credit/auto-topup/settings", auto_topup_settings_put, methods=["PUT"]),
]
