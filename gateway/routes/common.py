"""What the JSON routes share: reaching the services, authenticating, one error path."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from budget.money import InvalidAmount, parse_decimal, usd_to_micros
from credit.errors import CreditError
from credit.ports import DatabaseUnavailable
from gateway.auth import Caller, require_admin, require_practice
from gateway.errors import (
    GatewayError,
    bad_request,
    credit_status,
    forbidden,
    unavailable,
    unprocessable,
)
from gateway.messages import credit_user_message, user_message
from gateway.request_context import request_id_of

if TYPE_CHECKING:
    from gateway.services import Services
    from gateway.settings import Settings

log = logging.getLogger("aza.routes")

Handler = Callable[[Request], Awaitable[Response]]


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def credit_error(exc: Exception, settings: Settings | None = None) -> GatewayError:
    """A `credit.service.CreditError` as the client sees it, `message_user` in the
    configured language."""
    status = credit_status(exc) if isinstance(exc, CreditError) else 400
    message_user = getattr(exc, "message_user", None)
    if settings is not None:
        message_user = credit_user_message(
            getattr(exc, "error_code", None),
            getattr(exc, "param", None),
            settings.user_language,
            german=message_user,
            min_chf=settings.credit.min_topup_chf,
            max_chf=settings.credit.max_topup_chf,
        )
    return GatewayError(
        status,
        str(getattr(exc, "message", None) or exc),
        type="invalid_request_error" if status < 500 else "server_error",
        code=str(getattr(exc, "error_code", "credit_error")).lower(),
        param=getattr(exc, "param", None),
        error_code=getattr(exc, "error_code", None),
        message_user=message_user,
    )


def endpoint(handler: Handler) -> Handler:
    """Wrap a route so every failure leaves in the OpenAI error shape, with a request id."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        # The id the request context middleware gave this request (and logs).
        request_id = request_id_of(request.scope)
        try:
            response = await handler(request)
        except GatewayError as exc:
            return exc.response(request_id)
        except CreditError as exc:
            settings = getattr(getattr(request.app.state, "services", None), "settings", None)
            return credit_error(exc, settings).response(request_id)
        except DatabaseUnavailable:
            log.warning("database unavailable", extra={"request_id": request_id})
            return unavailable().response(request_id)
        response.headers.setdefault("x-request-id", request_id)
        return response

    return wrapped


async def caller_of(request: Request) -> Caller:
    services = services_of(request)
    return await services.auth.authenticate(request.headers)


async def practice_of(request: Request) -> tuple[Caller, str]:
    """The caller and the practice it may act for (its key's, or X-Practice-Id for the service)."""
    caller = await caller_of(request)
    return caller, require_practice(caller)


async def admin_practice_of(request: Request) -> tuple[Caller, str]:
    """Like `practice_of`, for routes that need an admin key (or the service token)."""
    caller = await caller_of(request)
    try:
        require_admin(caller)
    except GatewayError as exc:
        # The sentence a person reads, in the configured language.
        exc.message_user = user_message(
            "ADMIN_KEY_REQUIRED", services_of(request).settings.user_language
        )
        raise
    return caller, require_practice(caller)


async def service_caller(request: Request) -> Caller:
    """Only the service token (AZA_API_TOKEN) passes; a practice key gets 403."""
    caller = await caller_of(request)
    if not caller.is_service:
        raise forbidden("This route needs the service token.", code="service_token_required")
    return caller


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object body ({} when empty); 400 when it is not a JSON object."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
        raise bad_request("Invalid JSON body.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The JSON body must be an object.", code="invalid_json")
    return data


def decimal_field(data: dict[str, Any], name: str, *, required: bool = True) -> Decimal | None:
    """A finite decimal from a JSON number or numeric string; 422 otherwise."""
    if name not in data or data[name] is None:
        if required:
            raise unprocessable(f"'{name}' is required.", code="missing_field", param=name)
        return None
    raw = data[name]
    try:
        value = parse_decimal(raw, what=name, finite=False)
    except InvalidAmount:
        raise unprocessable(
            f"'{name}' must be a number.", code="invalid_amount", param=name
        ) from None
    if not value.is_finite():
        raise unprocessable(f"'{name}' must be a finite number.", code="invalid_amount", param=name)
    return value


# The largest amount a limit or alert threshold takes (far above any practice's month;
# its micro-USD stay well inside a 64-bit integer column).
MAX_LIMIT_USD = Decimal(1_000_000_000)
_MICRO = Decimal("0.000001")


def micro_usd_field(data: dict[str, Any], name: str) -> int | None:
    """An optional USD amount from 0 to MAX_LIMIT_USD in whole micro-USD, as micro-USD
    (None when absent or null); 422 `invalid_amount` otherwise, never rounded (a cap of
    "0.0000001" is refused, not made 0)."""
    amount = decimal_field(data, name, required=False)
    if amount is None:
        return None
    if amount < 0:
        raise unprocessable(f"'{name}' cannot be negative.", code="invalid_amount", param=name)
    if amount > MAX_LIMIT_USD:
        raise unprocessable(
            f"'{name}' can be at most {MAX_LIMIT_USD} USD.", code="invalid_amount", param=name
        )
    if amount != amount.quantize(_MICRO):
        raise unprocessable(
            f"'{name}' has more than 6 decimal places (micro-USD).",
            code="invalid_amount",
            param=name,
        )
    return usd_to_micros(amount)


def ok(payload: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(payload, status_code=status)
