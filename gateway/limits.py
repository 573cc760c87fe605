"""Request body limits: each route's, enforced before its body is read.

The OpenAI API paths are bounded by the metering middleware itself
(`AZA_MAX_REQUEST_BODY_BYTES`, a little above OpenAI's 25 MB), which reads
their bodies; every other route goes through `BodyLimitMiddleware`, which
refuses a declared Content-Length above the route's limit without reading a
byte and counts a chunked body as it arrives, stopping at the limit. Either
way the client gets 413 `request_too_large` and the rest of the body is
never read (the server closes the connection).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError
from gateway.files import MAX_JSON_BODY_BYTES

# Stripe's event payloads are a few kB; 1 MiB leaves room for large objects.
WEBHOOK_BODY_BYTES = 1024 * 1024
# The credit and admin routes take a handful of JSON fields.
JSON_ROUTE_BODY_BYTES = 64 * 1024

_LIMITS_BY_PATH = {"/v1/stripe/webhook": WEBHOOK_BODY_BYTES}


def body_limit(path: str) -> int | None:
    """The largest body, in bytes, the gateway's own route at `path` accepts."""
    return _LIMITS_BY_PATH.get(path, JSON_ROUTE_BODY_BYTES)


def files_body_limit(path: str) -> int | None:
    """The Files and Batch handlers: uploads bound themselves (gateway/files.py), JSON 1 MiB."""
    if path.startswith(("/v1/files", "/v1/uploads")):
        return None
    return MAX_JSON_BODY_BYTES


class BodyTooLarge(GatewayError):
    """A request body above its route's limit (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"Request body too large: the limit is {limit} bytes.",
            type="invalid_request_error",
            code="request_too_large",
        )
        self.limit = limit


def declared_too_large(scope: Scope, limit: int) -> bool:
    """Whether the request's Content-Length already says it exceeds `limit`."""
    declared = Headers(scope=scope).get("content-length")
    return (
        declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit
    )


class BodyLimitMiddleware:
    """Refuses bodies above `limit_for(path)` with 413 before the route reads them.

    `limit_for` returning None leaves a route to bound its body itself.
    """

    def __init__(
        self, app: ASGIApp, *, limit_for: Callable[[str], int | None] = body_limit
    ) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id: str | None = scope.get("state", {}).get("request_id")
        limit = self.limit_for(scope["path"])
        if limit is None:
            await self.app(scope, receive, send)
            return
        if declared_too_large(scope, limit):
            await BodyTooLarge(limit).send(send, request_id)
            return
        received = 0
        started = False

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised into whoever reads: routes answer it in the
                    # OpenAI shape; below, the middleware does if they don't.
                    raise BodyTooLarge(limit)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, bounded_receive, watched_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await exc.send(send, request_id)
