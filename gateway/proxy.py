"""The reverse proxy: forwards an OpenAI API request upstream and streams the answer back.

Called by the metering middleware (`Proxy.forward`, with the request's
`gateway.handover.Handover`). It swaps the client's credentials
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
from typing import TYPE_CHECKING

from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from gateway.errors import GatewayError, unauthorized
from gateway.handover import Handover
from gateway.metrics import GatewayMetrics
from gateway.paths import upstream_path
from gateway.redact import MAX_ERROR_BODY_BYTES, client_error_body
from gateway.routing import MAX_TRIES, Route, Upstream
from gateway.settings import Settings
from gateway.upstream import (
    NOT_SENT_ERRORS,
    Header,
    UpstreamConnectError,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from gateway.services import Services

log = logging.getLogger("aza.gateway.proxy")

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


def _connection_listed(values: Iterable[bytes]) -> frozenset[bytes]:
    """Header names a `Connection` header marks as hop-by-hop for this connection only."""
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


def upstream_request_headers(
    headers: Iterable[tuple[bytes, bytes]], auth: Header | None
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
    if auth is not None:
        forwarded.append(auth)
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


def upstream_refused_credentials(key_env: str = "OPENAI_API_KEY") -> GatewayError:
    return GatewayError(
        502,
        f"The upstream API refused the gateway's own credentials; the operator must fix {key_env}.",
        type="server_error",
        code="upstream_auth_failed",
    )


def _regions_text(regions: frozenset[str] | None) -> str:
    return ", ".join(sorted(regions)) if regions else "any region"


def no_upstream_answered(route: Route) -> GatewayError:
    """None of the upstreams allowed for the request answered (never another region)."""
    return GatewayError(
        503,
        f"No upstream in the regions this practice is allowed ({_regions_text(route.regions)}) "
        "answered; the request was not sent to any other region. Try again shortly.",
        type="server_error",
        code="upstream_unavailable_in_region",
        headers={"retry-after": "2"},
    )


def no_upstream_serves(route: Route) -> GatewayError:
    """No upstream of the practice's regions serves the model."""
    what = f"the model '{route.model}'" if route.model else "this request"
    return GatewayError(
        503,
        f"No upstream in the regions this practice is allowed ({_regions_text(route.regions)}) "
        f"serves {what}; it is not sent to any other region.",
        type="server_error",
        code="no_upstream_in_region",
        param="model" if route.model else None,
    )


def _retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


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
    """Forwards the requests the metering middleware hands it, with the shared client."""

    def __init__(
        self,
        *,
        services: Callable[[], Services],
        settings: Settings,
        metrics: Callable[[], GatewayMetrics],
    ) -> None:
        # The services and metrics are made in the lifespan, after this app.
        self._services = services
        self._metrics = metrics
        self._body_limit = settings.max_request_body_bytes

    async def forward(self, handover: Handover, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward one request the metering middleware matched and authenticated.

        What the middleware knows of the request comes in `handover`; the
        proxy writes `handover.answered_by` as soon as an upstream answers.
        """
        assert scope["type"] == "http"
        request_id: str | None = scope.get("state", {}).get("request_id")
        if handover.caller is None:
            # Only the metering middleware, after authentication, calls the proxy.
            await unauthorized().send(send, request_id)
            return
        match = handover.match
        # A metered body was bounded by the middleware before it was rewritten
        # (include_usage makes it a little longer); count only the others.
        limit = None if handover.body_checked else self._body_limit
        try:
            body = await read_bounded_body(scope, receive, limit)
        except GatewayError as exc:
            await exc.send(send, request_id)
            return
        except ClientGone:
            return
        raw_query: bytes = scope.get("query_string", b"")
        query = raw_query.decode("latin-1") if raw_query else ""
        route = handover.route
        if route is None:
            route = self._services().router.route(None, None)
        if not route.upstreams:
            await no_upstream_serves(route).send(send, request_id)
            return
        # The client's base URL ends in /v1, and so does an OpenAI upstream's.
        # Built from the endpoint table's template, never the client's path.
        below_v1 = upstream_path(match)
        forwarded = upstream_request_headers(scope["headers"], None)
        metrics = self._metrics()
        picked = await self._first_answer(route, scope, below_v1, query, forwarded, body)
        if isinstance(picked, GatewayError):
            await picked.send(send, request_id)
            return
        upstream, response, latency = picked
        handover.answered_by = upstream
        metrics.upstream_latency.labels(match.endpoint.template).observe(latency)
        if response.status_code >= 400:
            metrics.upstream_errors.labels(str(response.status_code)).inc()
        if response.status_code == 401:
            # About the gateway's upstream key, not the client's: OpenAI's body
            # echoes part of that key, and a 401 would tell the client its own
            # gateway key is wrong. Neither reaches the client.
            await response.aclose()
            log.warning("upstream %s refused its API key (401)", upstream.name)
            await upstream_refused_credentials(upstream.config.api_key_env).send(send, request_id)
            return
        if response.status_code >= 400:
            await self._send_error(response, send, known=(upstream.config.api_key.reveal(),))
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

    async def _first_answer(
        self,
        route: Route,
        scope: Scope,
        below_v1: str,
        query: str,
        forwarded: list[Header],
        body: bytes,
    ) -> tuple[Upstream, UpstreamResponse, float] | GatewayError:
        """Send to the route's upstreams in turn until one answers; its answer, or the error.

        A connect error (the upstream never saw the request), a 429 or a 5xx
        moves on to the next upstream of the route, at most MAX_TRIES in all,
        skipping those whose breaker is open; nothing has reached the client
        yet. The last upstream's 429/5xx goes to the client as it is. The one
        upstream of AZA_UPSTREAM_BASE_URL answers its errors as it always did.
        """
        metrics = self._metrics()
        upstreams = route.upstreams
        last = len(upstreams) - 1
        tries = 0
        failed: Upstream | None = None
        error: UpstreamError | None = None
        content_type = ""
        if upstreams[0].config.kind == "azure" or len(upstreams) > 1:
            content_type = Headers(scope=scope).get("content-type", "")
        for index, upstream in enumerate(upstreams):
            # The breaker's clock; the upstream of AZA_UPSTREAM_BASE_URL has no breaker.
            now = time.monotonic() if upstream.region is not None else 0.0
            final = index == last or tries + 1 >= MAX_TRIES
            if upstream.region is not None and not upstream.breaker.available(now):
                upstream.stats.error("breaker_open")
                if final:
                    break
                continue
            tries += 1
            if failed is not None:
                failed.stats.failovers += 1
                log.warning("failing over from upstream %s to %s", failed.name, upstream.name)
            stats = upstream.stats
            stats.requests += 1
            auth = upstream.auth
            if auth is not None:
                forwarded.append(auth)  # taken off again before the next try
            started = time.perf_counter()
            try:
                response = await upstream.client.send(
                    scope["method"],
                    upstream.target(below_v1, query, route.model),
                    headers=forwarded,
                    content=upstream.body(below_v1, body, route.model, content_type),
                )
            except UpstreamError as exc:
                if auth is not None:
                    forwarded.pop()
                kind = (
                    "timeout"
                    if isinstance(exc, UpstreamTimeout)
                    else "connect"
                    if isinstance(exc, UpstreamConnectError)
                    else "protocol"
                )
                stats.error(kind)
                metrics.upstream_errors.labels(
                    "timeout" if kind == "timeout" else "connection"
                ).inc()
                upstream.breaker.failure(now)
                log.warning("upstream %s failed: %s", upstream.name, exc)
                error, failed = exc, upstream
                if final or not isinstance(exc, NOT_SENT_ERRORS):
                    break
                continue
            latency = time.perf_counter() - started
            stats.observe(latency)
            status = response.status_code
            if _retryable_status(status):
                stats.error(str(status))
                upstream.breaker.failure(now)
                if not final:
                    await response.aclose()
                    if auth is not None:
                        forwarded.pop()
                    failed = upstream
                    continue
            else:
                upstream.breaker.success()
            return upstream, response, latency
        if error is not None and upstreams[0].region is None:
            # The one upstream of AZA_UPSTREAM_BASE_URL: as before the upstreams file.
            return (
                upstream_timeout() if isinstance(error, UpstreamTimeout) else upstream_unreachable()
            )
        if error is not None and not isinstance(error, NOT_SENT_ERRORS):
            # The upstream may have seen the request: not tried elsewhere, and said so.
            return (
                upstream_timeout() if isinstance(error, UpstreamTimeout) else upstream_unreachable()
            )
        return no_upstream_answered(route)

    async def _send_error(
        self, response: UpstreamResponse, send: Send, *, known: tuple[str, ...]
    ) -> None:
        """An upstream error answer, rebuilt in OpenAI's shape without anything key-like."""
        kept = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                kept.extend(chunk[: MAX_ERROR_BODY_BYTES - len(kept)])
                if len(kept) >= MAX_ERROR_BODY_BYTES:
                    break
        except UpstreamError:
            pass  # what arrived is judged; a cut body becomes the generic message
        finally:
            await response.aclose()
        body = client_error_body(response.status_code, bytes(kept), known)
        headers = [
            (name, value)
            for name, value in client_response_headers(response.headers)
            if name not in (b"content-length", b"content-type")
        ]
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": body, "more_body": False})


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
