"""The one error path: every failure a client sees, in OpenAI's error shape.

`{"error": {"message", "type", "code", "param"}}`, plus the gateway's own
`error_code`, `message_user` (a sentence a practice member can act on) and
`request_id` where they apply. Only `gateway/` turns exceptions into HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Send

from credit.errors import CreditError, Refusal

# The HTTP status of each kind of credit refusal: the one place it is decided.
CREDIT_REFUSAL_STATUS: Mapping[Refusal, int] = {
    Refusal.INVALID: 422,
    Refusal.BAD_REQUEST: 400,
    Refusal.FORBIDDEN: 403,
    Refusal.CONFLICT: 409,
    Refusal.NOT_CONFIGURED: 503,
    Refusal.UNAVAILABLE: 503,
    Refusal.REFUSED_UPSTREAM: 502,
}


def credit_status(exc: CreditError) -> int:
    """The HTTP status a credit refusal answers with."""
    return CREDIT_REFUSAL_STATUS[exc.kind]


class GatewayError(Exception):
    """A failure to report to the client; `status` is the HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        error_code: str | None = None,
        message_user: str | None = None,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.error_code = error_code
        self.message_user = message_user
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "code": self.code,
            "param": self.param,
        }
        if self.error_code is not None:
            error["error_code"] = self.error_code
        if self.message_user is not None:
            error["message_user"] = self.message_user
        if request_id is not None:
            error["request_id"] = request_id
        error.update(self.extra)
        payload: dict[str, Any] = {"error": error}
        # The seed's clients read these at the top level too.
        for key in ("error_code", "message_user", "request_id"):
            if key in error:
                payload[key] = error[key]
        return payload

    def response(self, request_id: str | None = None) -> Response:
        headers = dict(self.headers)
        if request_id is not None:
            headers.setdefault("x-request-id", request_id)
        return Response(
            json.dumps(self.body(request_id), separators=(",", ":")),
            status_code=self.status,
            headers=headers,
            media_type="application/json",
        )

    async def send(self, send: Send, request_id: str | None = None) -> None:
        """Write this error as a complete HTTP response on a raw ASGI `send`."""
        body = json.dumps(self.body(request_id), separators=(",", ":")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if request_id is not None:
            headers.append((b"x-request-id", request_id.encode()))
        headers.extend((k.lower().encode(), v.encode()) for k, v in self.headers.items())
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def unauthorized(message: str = "Missing or invalid API key.") -> GatewayError:
    return GatewayError(401, message, type="invalid_request_error", code="invalid_api_key")


def forbidden(message: str, *, code: str = "forbidden") -> GatewayError:
    return GatewayError(403, message, type="permission_error", code=code)


def not_found(message: str = "Unknown path.") -> GatewayError:
    return GatewayError(404, message, type="invalid_request_error", code="unknown_url")


def bad_request(
    message: str, *, code: str = "invalid_request", param: str | None = None
) -> GatewayError:
    return GatewayError(400, message, type="invalid_request_error", code=code, param=param)


def unprocessable(message: str, *, code: str, param: str | None = None) -> GatewayError:
    return GatewayError(422, message, type="invalid_request_error", code=code, param=param)


def unavailable(
    message: str = "The gateway's database is unavailable; try again shortly.",
) -> GatewayError:
    return GatewayError(
        503, message, type="server_error", code="service_unavailable", headers={"retry-after": "2"}
    )
