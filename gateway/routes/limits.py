"""Limits of one key or one device inside a practice (issue 18).

`PUT`/`GET /v1/ai-credit/keys/{prefix}/limits` (admin key of the practice),
`PUT`/`GET /v1/admin/keys/{prefix}/limits` (service token),
`PUT`/`GET /v1/ai-credit/devices/{device_id}/limits` (admin key), with
`{"monthly_cap_usd": "1.00", "requests_per_minute": 60, "tokens_per_minute": 100000}`:
each field optional (a PUT keeps what it does not name), `null` meaning no
limit; amounts as decimal strings or numbers. A change takes effect at once
on the instance that took it, and on the others within the key cache's time
(`auth_cache_seconds`, 30 s by default), as a revocation does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from budget.limits import Limits, Scope, Subject
from gateway.alerts.events import usd_text
from gateway.errors import GatewayError, unprocessable
from gateway.routes.common import (
    admin_practice_of,
    endpoint,
    json_body,
    micro_usd_field,
    ok,
    service_caller,
    services_of,
)

if TYPE_CHECKING:
    from gateway.services import Services

MAX_DEVICE_ID = 200
# Far above any real rate (OpenAI's highest tiers allow some 10^8 tokens a minute), and
# small enough for the windows' 64-bit counters.
MAX_PER_MINUTE = 1_000_000_000
# What a GET answers besides the limits: a PUT of a GET's answer is taken, these ignored.
_READ_ONLY = frozenset({"ok", "key_prefix", "device_id", "used_this_period_usd"})


def _count(data: dict[str, Any], name: str, current: int | None) -> int | None:
    if name not in data:
        return current
    value = data[name]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PER_MINUTE:
        raise unprocessable(
            f"'{name}' must be a whole number from 1 to {MAX_PER_MINUTE}, or null for no limit.",
            code="invalid_limit",
            param=name,
        )
    return value


def parse_limits(data: dict[str, Any], current: Limits) -> Limits:
    """`current` with the limits `data` names; 422 on the first bad one."""
    unknown = set(data) - {"monthly_cap_usd", "requests_per_minute", "tokens_per_minute"}
    unknown -= _READ_ONLY
    if unknown:
        name = sorted(unknown)[0]
        raise unprocessable(f"Unknown field '{name}'.", code="unknown_field", param=name)
    new = current
    if "monthly_cap_usd" in data:
        new = replace(new, monthly_cap_micros=micro_usd_field(data, "monthly_cap_usd"))
    return replace(
        new,
        requests_per_minute=_count(data, "requests_per_minute", current.requests_per_minute),
        tokens_per_minute=_count(data, "tokens_per_minute", current.tokens_per_minute),
    )


async def _view(request: Request, subject: Subject) -> dict[str, Any]:
    services = services_of(request)
    limits = subject.limits
    state = await services.metering.state(subject.practice_id)
    used = 0
    if state.period is not None:
        used = await services.limits.used_micros(subject, state.period.start)
    cap = limits.monthly_cap_micros
    return {
        "ok": True,
        "device_id" if subject.scope is Scope.DEVICE else "key_prefix": subject.name,
        "monthly_cap_usd": None if cap is None else usd_text(cap),
        "requests_per_minute": limits.requests_per_minute,
        "tokens_per_minute": limits.tokens_per_minute,
        "used_this_period_usd": usd_text(used),
    }


async def change_limits(
    services: Services, practice_id: str, scope: Scope, name: str, data: dict[str, Any]
) -> Limits:
    """Apply a PUT's `data` to the limits of a key or device (validated by `parse_limits`,
    422 on the first bad field, nothing changed then); the limits now. The PUT routes
    and the console's forms both come here."""
    limits = parse_limits(data, await services.limits.get(practice_id, scope, name))
    await services.limits.put(practice_id, scope, name, limits)
    services.auth.forget()  # this instance's cached key lookups carry the old limits
    return limits


async def check_key_of_practice(services: Services, practice_id: str, prefix: str) -> None:
    """404 `key_not_found` unless an active key of the practice has `prefix`."""
    if practice_id not in await services.metering.practices_of_prefix(prefix):
        raise GatewayError(
            404, "No active key of this practice has that prefix.", code="key_not_found"
        )


def check_device_id(device_id: str) -> None:
    """422 `invalid_device_id` unless `device_id` can be an X-Device-Id."""
    if not device_id or len(device_id) > MAX_DEVICE_ID or not device_id.isprintable():
        raise unprocessable(
            f"A device id is 1 to {MAX_DEVICE_ID} printable characters.",
            code="invalid_device_id",
            param="device_id",
        )


async def _answer(request: Request, practice_id: str, scope: Scope, name: str) -> Response:
    """GET answers the limits; PUT changes the named ones first."""
    services = services_of(request)
    if request.method == "PUT":
        limits = await change_limits(services, practice_id, scope, name, await json_body(request))
    else:
        limits = await services.limits.get(practice_id, scope, name)
    return ok(await _view(request, Subject(practice_id, scope, name, limits)))


def _prefix(request: Request) -> str:
    return str(request.path_params["prefix"])


@endpoint
async def practice_key_limits(request: Request) -> Response:
    """GET/PUT /v1/ai-credit/keys/{prefix}/limits: a key of the caller's own practice."""
    _, practice_id = await admin_practice_of(request)
    prefix = _prefix(request)
    await check_key_of_practice(services_of(request), practice_id, prefix)
    return await _answer(request, practice_id, Scope.KEY, prefix)


@endpoint
async def admin_key_limits(request: Request) -> Response:
    """GET/PUT /v1/admin/keys/{prefix}/limits: any practice's key (service token)."""
    await service_caller(request)
    prefix = _prefix(request)
    practices = await services_of(request).metering.practices_of_prefix(prefix)
    if not practices:
        raise GatewayError(404, "No active key has that prefix.", code="key_not_found")
    if len(practices) > 1:
        raise GatewayError(
            409, "Keys of several practices have that prefix.", code="key_prefix_ambiguous"
        )
    return await _answer(request, practices[0], Scope.KEY, prefix)


@endpoint
async def device_limits(request: Request) -> Response:
    """GET/PUT /v1/ai-credit/devices/{device_id}/limits: an X-Device-Id of the practice."""
    _, practice_id = await admin_practice_of(request)
    device_id = str(request.path_params["device_id"])
    check_device_id(device_id)
    return await _answer(request, practice_id, Scope.DEVICE, device_id)


routes: list[BaseRoute] = [
    Route("/v1/ai-credit/keys/{prefix}/limits", practice_key_limits, methods=["GET", "PUT"]),
    Route("/v1/admin/keys/{prefix}/limits", admin_key_limits, methods=["GET", "PUT"]),
    Route("/v1/ai-credit/devices/{device_id}/limits", device_limits, methods=["GET", "PUT"]),
]
