"""Request context: every HTTP request's id (`x-request-id`) and its count by path and status.

`RequestContextMiddleware` is the outermost pure ASGI middleware; the id it
gives a request (`scope["state"]["request_id"]`) is the one its usage event,
its logs and its error bodies carry.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.handover import handover_of
from gateway.services import Services

_request_id_prefix = os.urandom(8).hex()
_request_id_seq = itertools.count(1)


def _new_request_id_prefix() -> None:
    """A forked child numbers its requests under a prefix of its own."""
    global _request_id_prefix, _request_id_seq
    _request_id_prefix = os.urandom(8).hex()
    _request_id_seq = itertools.count(1)


os.register_at_fork(after_in_child=_new_request_id_prefix)


def new_request_id() -> str:
    """`req_` and 32 hex digits: 64 random bits for this process, then a 64-bit counter.

    Unique like a uuid4's hex (a usage event's request id must never repeat),
    without a call to the system's random source on every request (one was
    2.4 % of a request's CPU). Request ids are labels, not secrets.
    """
    return f"req_{_request_id_prefix}{next(_request_id_seq):016x}"


_OWN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def path_label(scope: Scope) -> str:
    """A bounded metrics label for a request path: its endpoint's template where it has one."""
    handover = handover_of(scope)
    if handover is not None:
        return handover.match.endpoint.template
    path: str = scope.get("path", "")
    if path in _OWN_PATHS:
        return path
    route = scope.get("route")
    route_path = getattr(route, "path", None)
    return route_path if isinstance(route_path, str) else "unmatched"


def request_id_of(scope: Scope) -> str:
    """The id the request context middleware gave this request, or a new one."""
    value = scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) and value else new_request_id()


class RequestContextMiddleware:
    """Gives every HTTP request an id (`x-request-id`) and counts it by path and status."""

    def __init__(self, app: ASGIApp, *, services: Callable[[], Services | None]) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers.append("x-request-id", request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            services = self.services()
            if services is not None:
                services.metrics.requests.labels(path_label(scope), str(status)).inc()
