"""Pure ASGI middleware: metering (the budget gate and the usage tap).

`MeteringMiddleware` sits in front of the proxy (behind the request context,
`gateway.request_context`). For each OpenAI API request it authenticates the
caller, reads the body (bounded), prices an estimate and places a hold (the
gate, `gateway.admission`, with one auto top-up retry), then lets the proxy
forward the request while it watches the response go by (the tap): a stream's
bytes pass through `budget.stream`'s tap on their way to the client, a
whole body is kept to read its usage. When the response has been sent, or the
client went away, the hold is replaced by one usage event (or released when
the upstream failed) in a task the request's cancellation cannot stop.

Per-request state lives in locals of `__call__`; the middleware objects hold
only their options.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from budget.estimate import estimate_usage
from budget.limits import Subject
from budget.operations import (
    AUDIO_UPLOADS,
    IMAGE_UPLOADS,
    OWN_HANDLERS,
    Operation,
    match_endpoint,
)
from budget.output_limit import (
    MIN_OUTPUT_TOKENS,
    OUTPUT_LIMIT_FIELD,
    affordable_output_tokens,
    with_output_limit,
)
from budget.output_limit import RESPONSE_HEADER as OUTPUT_LIMIT_HEADER
from budget.pricing import UnpricedModel
from budget.request import InvalidRequest, RequestInfo, parse_request
from budget.response import exact_json, usage_from_response
from budget.stream import StreamTap, stream_tap_for
from budget.usage import Usage
from credit.ports import DatabaseUnavailable
from gateway.admission import budget_exhausted, gate
from gateway.auth import Caller, require_practice
from gateway.background import FINISHED, RUNNING, BackgroundResponses, response_status
from gateway.errors import GatewayError, bad_request, unavailable
from gateway.handover import HANDOVER, Handover
from gateway.limiting import (
    cap_reached,
    device_subject,
    hold_caps,
    rate_limited,
    release_limits,
    settle_limits,
    subjects_of,
    take_rates,
)
from gateway.messages import BUDGET_EXHAUSTED
from gateway.paths import BadPath, checked_path
from gateway.pricing import model_not_priced
from gateway.proxy import (
    ClientGone,
    Proxy,
    no_upstream_serves,
    read_bounded_body,
)
from gateway.request_context import new_request_id
from gateway.routing import Route
from gateway.services import Services
from gateway.storage.holds import Hold, Reservation
from gateway.storage.limits import CapHold
from gateway.storage.price_watch import PriceWatch

log = logging.getLogger("aza.gateway.metering")

# A whole (non-streamed) response is kept to read its usage up to this size;
# OpenAI's largest JSON answers (several base64 images) stay well below it.
MAX_KEPT_RESPONSE_BYTES = 64 * 1024 * 1024


def store_not_allowed(practice_id: str) -> GatewayError:
    return bad_request(
        "This gateway keeps no content at the upstream (zero retention), so 'store': true "
        "is refused. Leave 'store' out (it is sent as false) or set it to false. An operator "
        "may allow stored content for every practice with AZA_UPSTREAM_STORE=allow, or for "
        f"this practice with PUT /v1/admin/practices/{practice_id}/regions "
        '{"store": "allow"}.',
        code="store_not_allowed",
        param="store",
    )


def background_needs_store(practice_id: str) -> GatewayError:
    return bad_request(
        "A background response is kept at the upstream until it is fetched, and this "
        "gateway keeps no content at the upstream (zero retention), so 'background': true "
        "is refused. Send the request without 'background'. An operator may allow stored "
        "content for every practice with AZA_UPSTREAM_STORE=allow, or for this practice "
        f'with PUT /v1/admin/practices/{practice_id}/regions {{"store": "allow"}}.',
        code="store_not_allowed",
        param="background",
    )


def stored_content_refused() -> GatewayError:
    return GatewayError(
        403,
        "This gateway keeps no content at the upstream (zero retention): routes that read "
        "or change stored content (stored chat completions) are refused. An operator may "
        "allow them for the whole gateway with AZA_UPSTREAM_STORE=allow (a listing spans "
        "every practice on the upstream account, so no single practice can allow it).",
        type="permission_error",
        code="stored_content_disabled",
    )


@dataclass(frozen=True, slots=True)
class _Admitted:
    """A request the gate let through: its hold, what it asks for and the body to forward."""

    hold: Hold
    info: RequestInfo
    forward: bytes
    estimate: Usage
    device_id: str | None
    route: Route
    # The holds on the caps of the caller's key or device (issue 18); none without caps.
    caps: Sequence[CapHold] = ()
    # The output limit the gateway set on the request (it named none), if any.
    output_limit: int | None = None


@dataclass
class _Watch:
    """What the tap saw of one response."""

    status: int = 0
    completed: bool = False
    tap: StreamTap | None = None
    kept: bytearray | None = None
    # The price uplift of the upstream that answered (percent), and its name.
    uplift: Decimal = Decimal(0)
    upstream: str | None = None
    # Where a stored (or background) response is recorded; None for other requests.
    background: BackgroundResponses | None = None


class MeteringMiddleware:
    """The budget gate and the usage tap around the proxy, as one pure ASGI middleware.

    Requests it meters go straight to `proxy`: the router and Starlette's
    exception middleware would only find the proxy again, at a cost per
    request (the proxy answers its own errors). Everything else goes on to `app`.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        services: Callable[[], Services],
        proxy: Proxy,
        own: ASGIApp | None = None,
    ) -> None:
        self.app = app
        self.proxy = proxy
        self.services = services
        # The Files and Batch endpoints' handlers (gateway.batches), given the caller.
        self.own = own

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            # Judged on the bytes sent, before any route is matched (gateway/paths.py).
            path = checked_path(scope)
        except BadPath as exc:
            await exc.send(send, scope.get("state", {}).get("request_id"))
            return
        match = match_endpoint(scope["method"], path)
        if match is None:
            await self.app(scope, receive, send)
            return
        endpoint = match.endpoint
        services = self.services()
        state = scope.setdefault("state", {})
        # All that the proxy and the own handlers learn of the request (gateway/handover.py).
        handover = state[HANDOVER] = Handover(match)
        request_id: str = state.get("request_id") or state.setdefault(
            "request_id", new_request_id()
        )
        try:
            caller = await services.auth.authenticate(Headers(scope=scope))
            # Nothing reaches the upstream for a caller without a practice.
            require_practice(caller)
            handover.caller = caller
            admitted = None
            if endpoint.metered:
                admitted = await self._admit(
                    services, handover, scope, receive, endpoint.operation, caller, request_id
                )
        except GatewayError as exc:
            await exc.send(send, request_id)
            return
        except DatabaseUnavailable:
            log.exception("database unavailable while admitting %s", request_id)
            await unavailable().send(send, request_id)
            return
        except ClientGone:
            return
        if admitted is None:
            if endpoint.operation in OWN_HANDLERS and self.own is not None:
                await self.own(scope, receive, send)
                return
            # Model listing and stored content: authenticated, not metered.
            practice_id = caller.practice_id
            if endpoint.operation is Operation.RESPONSE_OBJECT:
                try:
                    await self._forward_owned(
                        services, handover, match.params["response_id"], scope, receive, send
                    )
                except GatewayError as exc:
                    await exc.send(send, request_id)
                return
            # Only the gateway-wide switch: a listing of stored completions
            # spans every practice that shares the upstream account.
            if (
                endpoint.operation is Operation.STORED_CONTENT
                and not services.settings.upstream_store_allowed
            ):
                await stored_content_refused().send(send, request_id)
                return
            handover.route = services.router.route(
                None,
                services.residency.regions_for(practice_id) if practice_id else None,
            )
            await self.proxy.forward(handover, scope, receive, send)
            return
        await self._forward_metered(services, handover, admitted, scope, receive, send)

    async def _forward_owned(
        self,
        services: Services,
        handover: Handover,
        response_id: str,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """A stored response's routes, for the practice that made it only (others get 404).

        Sent to the upstream that made it. When a background response not yet
        settled comes back finished (a poll or a cancel), it is settled here.
        """
        assert handover.caller is not None
        practice_id = require_practice(handover.caller)
        background = _background(scope)
        stored = await background.store.get(response_id)
        if stored is None or stored.practice_id != practice_id:
            raise GatewayError(
                404,
                f"No response found with id '{response_id}'.",
                type="invalid_request_error",
                param="response_id",
            )
        upstream = background.upstream(stored.upstream)
        if upstream is not None:
            handover.route = Route(None, None, (upstream,), upstream.uplift)
        if not stored.pending or scope["method"] == "DELETE":
            await self.proxy.forward(handover, scope, receive, send)
            return
        status = 0
        kept: bytearray | None = bytearray()

        async def send_watched(message: Message) -> None:
            nonlocal status, kept
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and kept is not None:
                kept.extend(message.get("body", b""))
                if len(kept) > MAX_KEPT_RESPONSE_BYTES:
                    kept = None
            await send(message)

        await self.proxy.forward(handover, scope, receive, send_watched)
        if status == 200 and kept is not None:
            data = exact_json(bytes(kept))
            if response_status(data) in FINISHED:
                await background.settle(stored, data)

    async def _stored_response(
        self,
        services: Services,
        admitted: _Admitted,
        watch: _Watch,
        background: BackgroundResponses,
    ) -> bool:
        """Record whose a stored response is; True when it runs on in the background.

        A background response answered queued or in progress keeps its hold
        (moved to a durable one, `gateway.background`) instead of settling now.
        """
        info, hold = admitted.info, admitted.hold
        data: dict[str, Any] | None = None
        response_id: str | None = None
        if watch.tap is not None:
            response_id = getattr(watch.tap, "object_id", None)
        elif watch.kept is not None and watch.completed:
            data = exact_json(bytes(watch.kept))
            found = data.get("id") if data is not None else None
            response_id = found if isinstance(found, str) else None
        if response_id is None:
            return False
        model = data.get("model") if data is not None else None
        pending = info.background and response_status(data) in RUNNING
        await background.register(
            response_id=response_id,
            practice_id=hold.practice_id,
            request_id=hold.request_id,
            info=info,
            model=model if isinstance(model, str) and model else info.model,
            upstream=watch.upstream,
            hold_micros=hold.amount_micros,
            pending=pending,
            caps=admitted.caps,
        )
        if pending:
            await services.metering.release(hold)  # the durable hold replaced it
            if admitted.caps:
                # So did the durable cap holds (settled with the response).
                await release_limits(services.limit_leases, admitted.caps)
        return pending

    async def _admit(
        self,
        services: Services,
        handover: Handover,
        scope: Scope,
        receive: Receive,
        operation: Operation,
        caller: Caller,
        request_id: str,
    ) -> _Admitted:
        """Read and check the request, price its estimate and place its hold (the gate)."""
        settings = services.settings
        practice_id = require_practice(caller)
        body = await read_bounded_body(scope, receive, settings.max_request_body_bytes)
        handover.body_checked = True
        content_type = Headers(scope=scope).get("content-type", "")
        try:
            if operation in AUDIO_UPLOADS or operation in IMAGE_UPLOADS:
                # Reading an upload's length walks its container, and image
                # uploads are large multipart bodies: off the loop.
                info, forward = await asyncio.to_thread(
                    parse_request, operation, content_type, body
                )
            else:
                info, forward = parse_request(operation, content_type, body)
        except InvalidRequest as exc:
            raise bad_request(exc.message, code=exc.code, param=exc.param) from None
        residency = services.residency
        if info.store and not residency.store_allowed(practice_id):
            raise store_not_allowed(practice_id)
        if info.background and info.store is None and not residency.store_allowed(practice_id):
            raise background_needs_store(practice_id)
        route = services.router.route(info.model, residency.regions_for(practice_id))
        if not route.upstreams:
            raise no_upstream_serves(route)
        pricing = services.pricing
        try:
            pricing.check(info.model, info.service_tier)
        except GatewayError:
            # Off the admitted path: only refusals pay for this write.
            await _record_refusal(services, info.model)
            raise
        estimate = estimate_usage(
            info, default_max_output_tokens=settings.default_max_output_tokens
        )
        try:
            # Held at the dearest upstream the request may go to.
            estimate_micros = pricing.cost_micros(estimate, route.max_uplift)
        except UnpricedModel:
            await _record_refusal(services, info.model)
            raise model_not_priced(info.model) from None
        subjects: list[Subject] = []
        key = caller.key
        if key is not None and (key.limits is not None or key.device_limits):
            # Only a key (or a practice) with limits gets here: they came with the key lookup.
            device = await device_subject(services.limits, caller, practice_id)
            subjects = subjects_of(caller, device)
        if subjects:
            refused = await take_rates(
                services.limit_leases,
                subjects,
                estimate,
                window_seconds=settings.rate_limit_window_seconds,
            )
            if refused is not None:
                services.metrics.gate_decisions.labels("rate_limited").inc()
                language = await services.alerts.language(practice_id)
                raise rate_limited(refused[0], refused[1], language)
        limit_field = OUTPUT_LIMIT_FIELD.get(operation) if info.max_output_tokens is None else None
        output_limit: int | None = None
        if limit_field is None:
            hold = await self._gate(services, practice_id, request_id, estimate_micros)
        else:
            # No output limit named: the gateway sets the one it holds for,
            # cut to what the budget affords (budget/output_limit.py).
            per_choice = max(1, info.choices)

            def cost_with(tokens: int) -> int:
                usage = replace(estimate, output_tokens=tokens * per_choice)
                return pricing.cost_micros(usage, route.max_uplift)

            hold, output_limit = await self._gate_limited(
                services,
                practice_id,
                request_id,
                estimate_micros,
                cost_with,
                most=settings.default_max_output_tokens,
            )
            estimate = replace(estimate, output_tokens=output_limit * per_choice)
            forward = with_output_limit(forward, limit_field, output_limit)
        try:
            caps: Sequence[CapHold] = ()
            if subjects:
                caps, full = await hold_caps(services.limit_leases, subjects, hold, estimate_micros)
                if full is not None:
                    services.metrics.gate_decisions.labels("cap_reached").inc()
                    raise cap_reached(full, await services.alerts.language(practice_id))
        except BaseException as exc:
            # Not admitted (a cap, the database, a client gone): the hold goes
            # back in a task of its own, so a cancellation cannot stop it, and
            # an error is answered only once it is back.
            released = services.spawn(
                services.metering.release(hold), name="release unadmitted hold"
            )
            if isinstance(exc, Exception):
                await asyncio.shield(released)
            raise
        handover.route = route
        return _Admitted(hold, info, forward, estimate, caller.device_id, route, caps, output_limit)

    async def _forward_metered(
        self,
        services: Services,
        handover: Handover,
        admitted: _Admitted,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Let the proxy forward the request while the tap watches the response go by."""
        info, forward = admitted.info, admitted.forward
        services.metrics.holds_in_flight.inc()
        # Renewed while the request runs, however long it streams; _finish ends it.
        services.metering.running.add(admitted.hold.hold_id)
        for cap in _own_caps(admitted.caps):
            services.limits.running.add(cap.hold_id)
        started_at = int(time.time())
        watch = _Watch()
        if info.operation is Operation.RESPONSES and (info.store or info.background):
            watch.background = _background(scope)
        replayed = False

        async def receive_forward() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": forward, "more_body": False}
            return await receive()

        async def send_watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                watch.status = message["status"]
                if admitted.output_limit is not None:
                    MutableHeaders(scope=message).append(
                        OUTPUT_LIMIT_HEADER, str(admitted.output_limit)
                    )
                if 200 <= watch.status < 300:
                    content_type = Headers(raw=message.get("headers", [])).get("content-type", "")
                    if content_type.startswith("text/event-stream"):
                        watch.tap = stream_tap_for(info)
                        if not info.client_wants_usage:
                            # The tap may remove the usage chunk: any length is stale.
                            del MutableHeaders(scope=message)["content-length"]
                    elif info.operation is not Operation.SPEECH:
                        watch.kept = bytearray()
            elif message["type"] == "http.response.body":
                chunk: bytes = message.get("body", b"")
                more = bool(message.get("more_body", False))
                if watch.tap is not None:
                    out = watch.tap.feed(chunk) if chunk else b""
                    if not more:
                        out += watch.tap.close()
                    message = {**message, "body": out}
                elif watch.kept is not None:
                    if len(watch.kept) + len(chunk) <= MAX_KEPT_RESPONSE_BYTES:
                        watch.kept.extend(chunk)
                    else:
                        watch.kept = None
                if not more:
                    watch.completed = True
            await send(message)

        try:
            await self.proxy.forward(handover, scope, receive_forward, send_watched)
        finally:
            answered = handover.answered_by
            if answered is not None:
                watch.uplift = answered.uplift
                watch.upstream = answered.name
            # Settle in its own task: a cancelled request (server shutdown,
            # client gone) must still replace its hold with its usage event.
            task = services.spawn(
                self._finish(services, admitted, watch, started_at),
                name=f"settle:{admitted.hold.request_id}",
            )
            await asyncio.shield(task)

    # -- the gate ---------------------------------------------------------

    async def _gate_limited(
        self,
        services: Services,
        practice_id: str,
        request_id: str,
        estimate_micros: int,
        cost_with: Callable[[int], int],
        *,
        most: int,
    ) -> tuple[Hold, int]:
        """The gate for a request the gateway sets the output limit of: its hold and that limit.

        The gate admits a request while anything is available, holding what
        is left when that is less than the estimate; here the output limit is
        then cut to what that partial hold affords (budget/output_limit.py),
        and where not even MIN_OUTPUT_TOKENS fit, the hold is released and
        the request refused with the usual 429.
        """
        hold = await self._gate(services, practice_id, request_id, estimate_micros)
        if hold.amount_micros >= estimate_micros:
            return hold, most
        tokens = affordable_output_tokens(
            cost_with, hold.amount_micros, most=most, least=MIN_OUTPUT_TOKENS
        )
        if tokens is not None:
            services.metrics.gate_decisions.labels("admitted_with_output_limit").inc()
            return hold, tokens
        await services.metering.release(hold)
        snapshot = (await services.metering.state(practice_id)).snapshot
        services.metrics.gate_decisions.labels("blocked").inc()
        raise budget_exhausted(services.settings.user_language, BUDGET_EXHAUSTED, snapshot)

    async def _gate(
        self, services: Services, practice_id: str, request_id: str, estimate_micros: int
    ) -> Hold:
        """Place the request's hold, topping up once when blocked; else raise 403/429."""
        metering = services.metering

        async def reserve() -> Reservation:
            return await metering.reserve(
                practice_id, request_id=request_id, estimate_micros=estimate_micros
            )

        return await gate(services, practice_id, reserve)

    # -- settling ---------------------------------------------------------

    async def _finish(
        self, services: Services, admitted: _Admitted, watch: _Watch, started_at: int
    ) -> None:
        """Replace the hold with the usage event, or release it when the upstream failed."""
        metering, metrics = services.metering, services.metrics
        hold = admitted.hold
        try:
            if not 200 <= watch.status < 300:
                await metering.release(hold)
                if admitted.caps:
                    await release_limits(services.limit_leases, admitted.caps)
                return
            if watch.background is not None and await self._stored_response(
                services, admitted, watch, watch.background
            ):
                return  # a background response: settled when it ends
            usage = _usage_of(admitted.info, admitted.estimate, watch)
            pricing = services.pricing
            try:
                # Priced at the upstream that answered (its uplift), once.
                cost = pricing.cost_micros(usage, watch.uplift)
            except UnpricedModel:
                # Checked before forwarding; a model name the upstream
                # answered with that has no price is charged at the estimate.
                cost = hold.amount_micros
            settlement = await metering.settle(
                hold,
                usage,
                cost_micros=cost,
                device_id=admitted.device_id,
                status="success" if watch.completed else "partial",
                started_at=started_at,
            )
            if admitted.caps:
                await settle_limits(
                    services.limit_leases,
                    admitted.caps,
                    cost,
                    retry_seconds=metering.retry_seconds,
                )
            if settlement.event_id is not None:
                metrics.usage_cost.inc(cost)
                metrics.usage_events.labels(
                    str(usage.operation), str(usage.estimated).lower()
                ).inc()
            state = settlement.state
            if state is not None and state.snapshot.available_percent < 100:
                services.schedule_auto_topup(
                    hold.practice_id,
                    available_percent=state.snapshot.available_percent,
                    subscription_id=hold.license.subscription_id,
                )
        except Exception:
            log.exception("settling request %s failed; its hold expires by itself", hold.request_id)
        finally:
            metrics.holds_in_flight.dec()
            metering.running.discard(hold.hold_id)
            for cap in _own_caps(admitted.caps):
                services.limits.running.discard(cap.hold_id)


def _own_caps(caps: Sequence[CapHold]) -> Iterator[CapHold]:
    """The cap holds that are rows of their own (a cap lease's share lives on the lease's row)."""
    return (cap for cap in caps if cap.lease is None)


def _background(scope: Scope) -> BackgroundResponses:
    """The app's background responses (made in the lifespan, with its follower)."""
    found: BackgroundResponses = scope["app"].state.background_responses
    return found


async def _record_refusal(services: Services, model: str) -> None:
    """Count an unpriced refusal for `aza-gateway prices check`; never fails the request."""
    try:
        await PriceWatch(services.db).record_refusal(model)
    except Exception:
        log.exception("could not record the unpriced refusal of %s", model)


def _usage_of(info: RequestInfo, estimate: Usage, watch: _Watch) -> Usage:
    """The usage to charge for a response the upstream answered with 2xx."""
    if watch.tap is not None:
        # Usage seen in the stream wins, even if the client left after it.
        return watch.tap.usage() or watch.tap.estimated_usage()
    usage: Usage | None = None
    if watch.completed:
        usage = usage_from_response(info, bytes(watch.kept or b""))
    return usage if usage is not None else estimate
