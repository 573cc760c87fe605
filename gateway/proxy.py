"""The reverse proxy: forwards an OpenAI API request upstream and streams the answer back.

An ASGI app behind the metering middleware. It swaps the client's credentials
for the upstream key, drops hop-by-hop and private headers both ways, asks the
upstream for an unencoded body (so usage can be read), and passes the
response's bytes on as they arrive. While a response streams it listens for
the client going away and then closes the upstream response at once, so an
abandoned stream stops costing money.

It knows nothing of budgets: the middleware watches what it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from budget.operations import match_endpoint
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.settings import Settings
from gateway.upstream import (
    Header,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
)

log = logging.getLogger("aza.gateway.proxy")

# Set in scope["state"] by the metering middleware once it has read and bounded the body.
BODY_CHECKED = "aza.body_checked"
# Set in scope["state"] by the metering middleware: the template of the endpoint matched.
ENDPOINT_TEMPLATE = "aza.endpoint_template"

# Headers that describe one connection, not the message (RFC 9110 §7.6.1), and
# those the proxy sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        # 100-continue is between the client and this server.
        "expect",
    }
)
# The client's credentials and identity stay with the gateway; the upstream
# gets the gateway's own key and organisation.
_PRIVATE_REQUEST_HEADERS = frozenset(
    {
        "authorization",
        "x-api-key",
        "x-practice-id",
        "x-device-id",
        "cookie",
        "openai-organization",
        "openai-project",
        "accept-encoding",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
    }
)
# Upstream response headers that are the upstream's business (its cookies, its
# account) or that the gateway's server writes itself.
_PRIVATE_RESPONSE_HEADERS = frozenset(
    {"set-cookie", "openai-organization", "openai-project", "server", "date", "alt-svc"}
)
# The same sets as the raw (lower-case bytes) names the proxy compares.
_DROPPED_REQUEST_HEADERS = frozenset(
    name.encode("latin-1") for name in HOP_BY_HOP | _PRIVATE_REQUEST_HEADERS
)
_DROPPED_RESPONSE_HEADERS = frozenset(
    name.encode("latin-1") for name in HOP_BY_HOP | _PRIVATE_RESPONSE_HEADERS
)


def is_proxied(method: str, path: str) -> bool:
    """True for the OpenAI API requests the gateway forwards upstream (budget.operations)."""
    return match_endpoint(method, path) is not None


def _connection_listed(values: Iterable[bytes]) -> frozenset[bytes]:
    """Header names a `Connection` header marks as hop-by-hop for this connection only."""
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


def upstream_request_headers(
    headers: Iterable[tuple[bytes, bytes]], upstream_key: str
) -> list[Header]:
    """The client's headers as the upstream gets them: private and hop-by-hop ones removed."""
    pairs = [(name.lower(), value) for name, value in headers]
    listed = _connection_listed(value for name, value in pairs if name == b"connection")
    forwarded = [
        (name, value)
        for name, value in pairs
        if name not in _DROPPED_REQUEST_HEADERS
        and name not in listed
        and not name.startswith(b"proxy-")
    ]
    forwarded.append((b"accept-encoding", b"identity"))
    if upstream_key:
        forwarded.append((b"authorization", b"Bearer " + upstream_key.encode("latin-1")))
    return forwarded


def client_response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers (names in lower case) as the client gets them."""
    headers = list(headers)
    encoded = any(
        name == b"content-encoding" and value.strip().lower() != b"identity"
        for name, value in headers
    )
    listed = _connection_listed(value for name, value in headers if name == b"connection")
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name in listed:
            continue
        if name == b"x-request-id":
            # The gateway's request id is the client's x-request-id; the
            # upstream's stays findable for support cases.
            out.append((b"x-upstream-request-id", value))
        elif name == b"content-length":
            if not encoded:
                out.append((name, value))
        elif name not in _DROPPED_RESPONSE_HEADERS and not name.startswith(b"proxy-"):
            out.append((name, value))
    return out


def upstream_timeout() -> GatewayError:
    return GatewayError(
        504,
        "The upstream API did not answer in time.",
        type="server_error",
        code="upstream_timeout",
    )


def upstream_unreachable() -> GatewayError:
    return GatewayError(
        502, "The upstream API could not be reached.", type="server_error", code="upstream_error"
    )


def upstream_refused_credentials() -> GatewayError:
    return GatewayError(
        502,
        "The upstream API refused the gateway's own credentials; the operator must fix "
        "OPENAI_API_KEY.",
        type="server_error",
        code="upstream_auth_failed",
    )


def too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"Request body too large: the limit is {limit} bytes.",
        type="invalid_request_error",
        code="request_too_large",
    )


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def read_bounded_body(scope: Scope, receive: Receive, limit: int | None) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes.

    The declared Content-Length is checked before anything is read; a
    chunked body is counted while it arrives.
    """
    declared = Headers(scope=scope).get("content-length")
    if limit is not None and declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class Proxy:
    """ASGI app forwarding each request to the upstream with the shared client."""

    def __init__(
        self,
        *,
        client: Callable[[], UpstreamClient],
        settings: Settings,
        metrics: Callable[[], GatewayMetrics],
    ) -> None:
        # The client and metrics are made in the lifespan, after this app.
        self._client = client
        self._metrics = metrics
        self._upstream_key = settings.upstream_api_key.reveal()
        self._body_limit = settings.max_request_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        request_id: str | None = scope.get("state", {}).get("request_id")
        state = scope.get("state", {})
        # A metered body was bounded by the middleware before it was rewritten
        # (include_usage makes it a little longer); count only the others.
        limit = None if state.get(BODY_CHECKED) else self._body_limit
        try:
            body = await read_bounded_body(scope, receive, limit)
        except GatewayError as exc:
            await exc.send(send, request_id)
            return
        except ClientGone:
            return
        path: str = scope["path"]
        query: bytes = scope.get("query_string", b"")
        # The client's base URL ends in /v1, and so does the upstream's.
        target = path[len("/v1") :] + ("?" + query.decode("latin-1") if query else "")
        client = self._client()
        metrics = self._metrics()
        started = time.perf_counter()
        try:
            response = await client.send(
                scope["method"],
                target,
                headers=upstream_request_headers(scope["headers"], self._upstream_key),
                content=body,
            )
        except UpstreamTimeout:
            metrics.upstream_errors.labels("timeout").inc()
            await upstream_timeout().send(send, request_id)
            return
        except UpstreamError as exc:
            log.warning("upstream unreachable: %s", exc)
            metrics.upstream_errors.labels("connection").inc()
            await upstream_unreachable().send(send, request_id)
            return
        metrics.upstream_latency.labels(state.get(ENDPOINT_TEMPLATE, path)).observe(
            time.perf_counter() - started
        )
        if response.status_code >= 400:
            metrics.upstream_errors.labels(str(response.status_code)).inc()
        if response.status_code == 401:
            # About the gateway's upstream key, not the client's: OpenAI's body
            # echoes part of that key, and a 401 would tell the client its own
            # gateway key is wrong. Neither reaches the client.
            await response.aclose()
            log.warning("upstream refused the upstream API key (401)")
            await upstream_refused_credentials().send(send, request_id)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": client_response_headers(response.headers),
                }
            )
            await _stream_body(response, receive, send)
        finally:
            await response.aclose()


async def _stream_body(response: UpstreamResponse, receive: Receive, send: Send) -> None:
    """Send the upstream body on as it arrives, until it ends or the client goes away.

    Returns without finishing the response when the client disconnected or
    the upstream broke off: the server then drops the connection, so the
    client sees a cut stream rather than a false end.

    The body is pumped in this task; one watcher task waits for the
    disconnect and then cancels the pump through an `asyncio.timeout` scope
    (which turns its own cancellation into `TimeoutError` and leaves any
    other, such as a server shutdown, alone). This uvicorn (ASGI spec 2.3)
    drops `send` calls silently after a disconnect, so `send` alone would not
    tell; a second task and `asyncio.wait` per request cost more than needed.
    """
    if response.fully_received:
        # Nothing left to wait for, so no client to watch: hand it all on.
        body = await response.aread()
        with contextlib.suppress(OSError):  # a server on ASGI 2.4: the client is gone
            await send({"type": "http.response.body", "body": body, "more_body": False})
        return
    loop = asyncio.get_running_loop()
    pumping = True

    async def client_gone() -> None:
        message: Message = await receive()
        while message["type"] != "http.disconnect":
            message = await receive()

    try:
        async with asyncio.timeout(None) as scope:

            def on_client_gone(task: asyncio.Task[None]) -> None:
                if pumping and not task.cancelled() and task.exception() is None:
                    scope.reschedule(loop.time())  # cancel the pump now

            watcher = loop.create_task(client_gone())
            watcher.add_done_callback(on_client_gone)
            try:
                async for chunk in response.aiter_bytes():
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                pumping = False
                watcher.cancel()
    except TimeoutError:
        if not scope.expired():
            raise
        # The client left; the caller's response.aclose() ends the upstream request.
    except UpstreamError as exc:
        log.warning("upstream stream broke off: %r", exc)
    except OSError:
        pass  # servers on ASGI spec 2.4 report a gone client from send()
