"""Realtime sessions through the gateway: the `/v1/realtime` WebSocket, metered per response.

A client connects as the official SDK does (`client.realtime.connect(model=...)`,
`Authorization: Bearer <gateway key>` on the upgrade). The gateway
authenticates it, holds the estimate of the session's first response (the
session opens only if the practice can afford it), opens the upstream's
Realtime WebSocket with the upstream key, and relays events both ways
unchanged, in order, as they arrive.

On the way it watches a few event types (read from each event's first
bytes; audio chunks are not parsed):

- before forwarding a client's `response.create` (and, in a transcription
  session, its `input_audio_buffer.commit`) it holds that response's
  estimate through the metering store, as for an HTTP request; when the
  practice cannot afford it (after one auto top-up attempt) the client gets
  an `error` event with `code: insufficient_quota` and the HTTP 429's
  `error_code` and `message_user`, the event is not forwarded, and the
  socket closes with 1008; the caller's key and device limits (issue 18)
  are applied there too: a cap as the budget, a rate limit with an `error`
  event (`rate_limit_exceeded`) while the session goes on;
- each `response.done` is charged by its usage, each transcription's
  `conversation.item.input_audio_transcription.completed` by its own, as one
  usage event with the request id `rt:<session id>:<response or item id>`, so
  a replay never charges twice.

When the client leaves mid-response the gateway cancels the response
upstream and waits briefly for its `response.done` (its usage); a response
that never reports one is charged at its estimate when the session ends;
holds not used are released (or expire, if the gateway dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)

from budget.limits import Subject
from budget.money import usd_to_micros
from budget.operations import Operation
from budget.pricing import UnpricedModel
from budget.realtime import (
    DEFAULT_TRANSCRIPTION_MODEL,
    SessionKind,
    SessionMeter,
    event_type,
    response_usage,
    transcription_model_of,
    transcription_usage,
)
from budget.usage import Usage
from credit.ports import DatabaseUnavailable
from gateway.admission import gate
from gateway.auth import Caller, require_practice
from gateway.errors import GatewayError, bad_request, forbidden, unavailable
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
from gateway.pricing import Pricing, model_not_priced
from gateway.proxy import (
    client_response_headers,
    no_upstream_serves,
    read_bounded_body,
    upstream_request_headers,
    upstream_unreachable,
)
from gateway.request_context import new_request_id, request_id_of
from gateway.routing import Upstream
from gateway.services import Services
from gateway.settings import Settings
from gateway.storage.holds import Hold, Reservation
from gateway.storage.limits import CapHold
from gateway.upstream import NoProxy, UpstreamError

log = logging.getLogger("aza.gateway.realtime")

REALTIME_PATH = "/v1/realtime"
# The ephemeral-key routes: a browser with such a key talks to OpenAI
# directly over WebRTC, past the gateway (refused unless the operator allows them).
EPHEMERAL_KEY_PATHS = (
    "/v1/realtime/client_secrets",
    "/v1/realtime/sessions",
    "/v1/realtime/transcription_sessions",
)
# WebRTC and SIP calls (`client.realtime.calls`): their media flows between the
# caller and OpenAI, past the gateway, and is not metered: always refused.
CALL_PATHS = ("/v1/realtime/calls", "/v1/realtime/calls/{call_id}/{action}")
# WebSocket close codes (RFC 6455): policy violation (the budget), internal error.
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_NORMAL = 1000
# Headers of the client's upgrade that the upstream needs (the beta protocol's switch).
_FORWARDED_HEADERS = ("openai-beta",)
_SESSION_EVENTS = frozenset(
    {
        "session.created",
        "session.updated",
        "transcription_session.created",
        "transcription_session.updated",
    }
)
_SERVER_WATCHED = _SESSION_EVENTS | {
    "error",
    "response.created",
    "response.done",
    "input_audio_buffer.committed",
    "conversation.item.input_audio_transcription.completed",
    "conversation.item.input_audio_transcription.failed",
}
_CLIENT_WATCHED = frozenset(
    {
        "session.update",
        "transcription_session.update",
        "conversation.item.create",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "response.create",
    }
)
_APPEND = "input_audio_buffer.append"
# Upstream errors that refuse a client's event without naming it (the SDK sends
# no event_id unless asked), by the event they refuse: no response or
# transcription follows, so that event's hold goes back.
_REFUSALS = {
    "conversation_already_has_active_response": "response.create",
    "input_audio_buffer_commit_empty": "input_audio_buffer.commit",
}
_server_event_ids = itertools.count(1)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _parse(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def hold_budget(
    services: Services, practice_id: str, request_id: str, estimate_micros: int
) -> Hold:
    """The gate for one Realtime response (or an ephemeral key): its hold, else 403/429.

    The gate admits while anything is left, holding what is left when that
    is less than the estimate (a scrap), and such a response may cost more
    than its hold. With several sessions (or other requests) of a practice
    in flight, each could take one of the scraps that the others' settles
    free up, and together they would overspend by a response each. So a
    scrap is taken only when nothing else of the practice is held, as the
    state the gate read under the practice's lock says (its holds before
    this one; so across instances too). Otherwise the partial hold goes back
    at once and the gate waits for the other holds to go (polling the state,
    up to `realtime_drain_seconds`, the time a response in flight is given)
    and tries again; then the response is refused (after the gate's one
    auto top-up), as it would be on an empty budget.
    """
    metering = services.metering
    loop = asyncio.get_running_loop()
    deadline = loop.time() + services.settings.realtime_drain_seconds

    async def reserve() -> Reservation:
        while True:
            reservation = await metering.reserve(
                practice_id, request_id=request_id, estimate_micros=estimate_micros
            )
            hold = reservation.hold
            if (
                hold is None
                or hold.amount_micros >= estimate_micros
                or reservation.state.snapshot.held_micros == 0
            ):
                return reservation
            await metering.release(hold)
            if not await _others_settle(services, practice_id, estimate_micros, deadline):
                return Reservation(hold=None, state=reservation.state)

    return await gate(services, practice_id, reserve)


async def _others_settle(
    services: Services, practice_id: str, estimate_micros: int, deadline: float
) -> bool:
    """Wait until the practice holds nothing or has `estimate_micros` free; False at `deadline`."""
    loop = asyncio.get_running_loop()
    delay = 0.02
    while (left := deadline - loop.time()) > 0:
        await asyncio.sleep(min(delay, left))
        snapshot = (await services.metering.state(practice_id)).snapshot
        if snapshot.held_micros == 0 or snapshot.available_micros >= estimate_micros:
            return True
        delay = min(2 * delay, 0.2)
    return False


async def limit_subjects(services: Services, caller: Caller, practice_id: str) -> list[Subject]:
    """The caller's key and device that have limits (issue 18), as the HTTP gate finds them."""
    key = caller.key
    if key is None or (key.limits is None and not key.device_limits):
        return []
    device = await device_subject(services.limits, caller, practice_id)
    return subjects_of(caller, device)


async def admit_response(
    services: Services,
    practice_id: str,
    subjects: Sequence[Subject],
    request_id: str,
    estimate: Usage,
    cost_micros: int,
    *,
    rates: bool = True,
) -> tuple[Hold, list[CapHold]]:
    """The gate of one Realtime response, as the HTTP gate's: the key's and device's rate
    windows (unless `rates` is False), the practice's budget, then their caps.

    Returns the budget hold and the cap holds; raises the 429 of whichever
    refused (`rate_limit_exceeded`, the cap's or the budget's `insufficient_quota`),
    with nothing left held.
    """
    subjects = list(subjects)
    if subjects and rates:
        refused = await take_rates(
            services.limit_leases,
            subjects,
            estimate,
            window_seconds=services.settings.rate_limit_window_seconds,
        )
        if refused is not None:
            services.metrics.gate_decisions.labels("rate_limited").inc()
            language = await services.alerts.language(practice_id)
            raise rate_limited(refused[0], refused[1], language)
    hold = await hold_budget(services, practice_id, request_id, cost_micros)
    if not subjects:
        return hold, []
    try:
        caps, full = await hold_caps(services.limit_leases, subjects, hold, cost_micros)
        if full is not None:
            services.metrics.gate_decisions.labels("cap_reached").inc()
            raise cap_reached(full, await services.alerts.language(practice_id))
    except BaseException as exc:
        # Not admitted: the budget's hold goes back in a task of its own, which
        # a cancellation cannot stop.
        released = services.spawn(services.metering.release(hold), name="release unadmitted hold")
        if isinstance(exc, Exception):
            await asyncio.shield(released)
        raise
    return hold, caps


def error_event(error: GatewayError, request_id: str, client_event_id: Any = None) -> str:
    """A gateway error as a Realtime `error` event, with the HTTP error's extra members."""
    body = error.body(request_id)
    details = dict(body["error"])
    details["event_id"] = client_event_id if isinstance(client_event_id, str) else None
    event = {
        "type": "error",
        "event_id": f"event_gw{next(_server_event_ids):08d}",
        **body,
        "error": details,
    }
    return _dumps(event)


def close_reason(error: GatewayError) -> str:
    """A close reason a person can read, within the 123 bytes a close frame allows."""
    code = error.error_code or error.code or "error"
    reason = f"{error.message} ({code})"
    return reason.encode()[:123].decode(errors="ignore")


@dataclass(slots=True)
class _Held:
    """A hold placed for one response or transcription, and what it was sized for."""

    hold: Hold | None  # None: placed after the upstream started it (see _hold_late)
    estimate: Usage
    started_at: int
    caps: Sequence[CapHold] = ()  # on the caps of the caller's key and device
    late: asyncio.Task[None] | None = None  # places `hold` and `caps` (see _hold_late)
    event: str = ""  # the client event it was placed for (response.create or a commit)
    event_id: str | None = None  # that event's own id, if it had one


class _Refused(Exception):
    """A gate refused the session's next response: `error` says why (the session ends)."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class _RateLimited(_Refused):
    """A rate limit refused the next response: the client is told, the session goes on."""


def _is_rate_limit(error: GatewayError) -> bool:
    return error.code == "rate_limit_exceeded"


class RealtimeSession:
    """One relayed Realtime session: its client, its upstream, its holds and charges."""

    def __init__(
        self,
        services: Services,
        *,
        practice_id: str,
        device_id: str | None,
        request_id: str,
        meter: SessionMeter,
        first: _Held,
        receive: Receive,
        send: Send,
        upstream: ClientConnection,
        uplift: Decimal,
        headers: Mapping[str, str],
    ) -> None:
        self.services = services
        self.headers = headers  # the upgrade's: each gate authenticates the key again
        self.pricing = services.pricing
        self.uplift = uplift  # the chosen upstream's price uplift, percent
        self.practice_id = practice_id
        self.device_id = device_id
        self.request_id = request_id
        self.meter = meter
        self.session_id = request_id  # the upstream's own id once session.created names it
        assert first.hold is not None
        self.license = first.hold.license
        self.period = first.hold.period
        self.ready: _Held | None = first  # held at the open, for the first response
        self.waiting: deque[_Held] = deque()  # held for a response.create / commit sent on
        self.running: dict[str, _Held] = {}  # by upstream response or item id
        # Upstream ids charged already: a replayed usage event is relayed, not charged
        # again (nor raced against the first one's settle; the database's unique
        # request id is the guard across sessions and instances).
        self.charged: set[str] = set()
        self.receive = receive
        self.send = send
        self.upstream = upstream
        self.client_open = True
        self._holds = itertools.count(1)
        self._work: set[asyncio.Task[Any]] = set()
        self._drained = asyncio.Event()

    # -- the relay --------------------------------------------------------

    async def run(self) -> None:
        """Relay until either side ends, then settle what is left."""
        services = self.services
        services.metrics.holds_in_flight.inc()
        to_upstream = asyncio.create_task(self._client_to_upstream(), name="realtime:client")
        to_client = asyncio.create_task(self._upstream_to_client(), name="realtime:upstream")
        try:
            await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED)
            if to_client.done():
                # The upstream ended the session: so does the client.
                to_upstream.cancel()
                code, reason = CLOSE_INTERNAL, "The upstream Realtime API closed the session."
                close = self.upstream.protocol.close_rcvd
                if close is not None and close.code in (CLOSE_NORMAL, CLOSE_POLICY):
                    code, reason = close.code, close.reason
                await self._close_client(code, reason)
            else:
                # The client left, or the gateway closed it (budget): cancel what
                # runs upstream and wait a little for its usage.
                failure = None if to_upstream.cancelled() else to_upstream.exception()
                if failure is not None and not isinstance(failure, ConnectionClosed):
                    log.error("realtime session %s failed", self.session_id, exc_info=failure)
                await self._close_client(CLOSE_INTERNAL, "The gateway closed the session.")
                await self._drain_upstream()
                to_client.cancel()
            for task in (to_upstream, to_client):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        finally:
            await self.upstream.close()
            # Settles in a task the session's cancellation cannot stop.
            await asyncio.shield(services.spawn(self._finish(), name=f"realtime:{self.session_id}"))

    async def _client_to_upstream(self) -> None:
        receive, upstream = self.receive, self.upstream
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                self.client_open = False
                return
            text: str | None = message.get("text")
            if text is None:
                await upstream.send(message.get("bytes") or b"")
                continue
            kind = event_type(text)
            if kind == _APPEND:
                self.meter.appended(len(text))
            else:
                parsed = None
                if kind is None:
                    parsed = _parse(text)
                    kind = parsed.get("type") if parsed is not None else None
                if kind in _CLIENT_WATCHED:
                    try:
                        forward = await self._on_client(str(kind), parsed or _parse(text) or {})
                    except _Refused as refused:
                        await self._refuse(refused.error, (parsed or _parse(text) or {}))
                        if isinstance(refused, _RateLimited):
                            continue  # not forwarded; the client may send it again
                        return
                    if not forward:
                        continue
            await upstream.send(text)

    async def _upstream_to_client(self) -> None:
        # The per-event path: one sniff of the type, the frame passed on as it came.
        send, watched = self.send, _SERVER_WATCHED
        try:
            async for message in self.upstream:
                if isinstance(message, str):
                    kind = event_type(message)
                    parsed = None
                    if kind is None:
                        parsed = _parse(message)
                        kind = parsed.get("type") if parsed is not None else None
                    if kind in watched:
                        self._on_server(str(kind), parsed or _parse(message) or {})
                    frame: Message = {"type": "websocket.send", "text": message}
                else:
                    frame = {"type": "websocket.send", "bytes": message}
                if self.client_open:
                    try:
                        await send(frame)
                    except (OSError, RuntimeError):
                        self.client_open = False
                elif not self.running:
                    self._drained.set()
        except ConnectionClosed:
            return
        finally:
            self._drained.set()

    async def _to_client(self, message: Message) -> None:
        try:
            await self.send(message)
        except (OSError, RuntimeError):
            self.client_open = False

    async def _close_client(self, code: int, reason: str) -> None:
        if self.client_open:
            self.client_open = False
            with contextlib.suppress(OSError, RuntimeError):
                await self.send({"type": "websocket.close", "code": code, "reason": reason})

    async def _drain_upstream(self) -> None:
        """Cancel the responses still running upstream; wait for their usage, briefly."""
        self.client_open = False
        if not self.running:
            return
        self._drained.clear()
        if self.meter.kind is SessionKind.CONVERSATION:
            with contextlib.suppress(ConnectionClosed):
                await self.upstream.send(_dumps({"type": "response.cancel"}))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.services.settings.realtime_drain_seconds):
                await self._drained.wait()

    # -- what the client sends --------------------------------------------

    async def _on_client(self, kind: str, event: Mapping[str, Any]) -> bool:
        """Note a watched client event; hold before a response or commit. False: do not forward."""
        meter = self.meter
        if kind in ("session.update", "transcription_session.update"):
            session = event.get("session")
            problem = self._unpriced_models(session)
            if problem is not None:
                await self._to_client(
                    {
                        "type": "websocket.send",
                        "text": error_event(problem, self.request_id, event.get("event_id")),
                    }
                )
                return False
            if isinstance(session, Mapping) and isinstance(session.get("instructions"), str):
                meter.added_text(len(session["instructions"]))
        elif kind == "conversation.item.create":
            meter.added_text(len(_dumps(event.get("item"))))
        elif kind == "input_audio_buffer.clear":
            meter.cleared()
        elif kind == "input_audio_buffer.commit":
            if meter.kind is SessionKind.TRANSCRIPTION:
                estimate = meter.transcription_estimate(meter.buffered_seconds())
                self._wait(await self._hold(estimate), kind, event)
            meter.committed()
        elif kind == "response.create":
            options = event.get("response")
            limit = None
            if isinstance(options, Mapping):
                value = options.get("max_output_tokens", options.get("max_response_output_tokens"))
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    limit = value
            self._wait(await self._hold(meter.response_estimate(limit)), kind, event)
        return True

    def _wait(self, held: _Held, kind: str, event: Mapping[str, Any]) -> None:
        """`held` waits for the upstream to start what `event` asks for."""
        event_id = event.get("event_id")
        held.event, held.event_id = kind, event_id if isinstance(event_id, str) else None
        self.waiting.append(held)

    def _refused_upstream(self, error: Any) -> None:
        """The upstream refused a client event: the hold waiting for it goes back."""
        if not isinstance(error, Mapping) or not self.waiting:
            return
        event_id, code = error.get("event_id"), error.get("code")
        kind = _REFUSALS.get(code) if isinstance(code, str) else None
        for held in reversed(self.waiting):
            if (isinstance(event_id, str) and held.event_id == event_id) or (
                event_id is None and kind is not None and held.event == kind
            ):
                self.waiting.remove(held)
                self._background(self._release(held))
                return

    def _unpriced_models(self, session: Any) -> GatewayError | None:
        """A session.update naming a model this gateway has no price for: refuse it."""
        if not isinstance(session, Mapping):
            return None
        for model in (session.get("model"), transcription_model_of(session)):
            if isinstance(model, str) and model:
                try:
                    self.pricing.check(model)
                except GatewayError as exc:
                    return exc
        return None

    async def _hold(self, estimate: Usage) -> _Held:
        """Hold `estimate` for the next response (the open's hold when it covers it)."""
        cost = self._cost(estimate)
        ready, self.ready = self.ready, None
        if ready is not None:
            assert ready.hold is not None
            if ready.hold.amount_micros >= cost and all(
                cap.amount_micros >= cost for cap in ready.caps
            ):
                return replace(ready, estimate=estimate)
            await self._release(ready)
            # The open counted this response in the rate windows already.
            return await self._gate(estimate, cost, rates=False)
        return await self._gate(estimate, cost)

    async def _gate(self, estimate: Usage, cost: int, *, rates: bool = True) -> _Held:
        """The gate of the next response: its budget and cap holds, else `_Refused`."""
        request_id = f"rt:{self.request_id}:hold{next(self._holds)}"
        services = self.services
        try:
            # Again each time: a key revoked, or limits changed, since the open count.
            caller = await services.auth.authenticate(self.headers)
            subjects = await limit_subjects(services, caller, self.practice_id)
            hold, caps = await admit_response(
                services, self.practice_id, subjects, request_id, estimate, cost, rates=rates
            )
        except GatewayError as exc:
            raise (_RateLimited if _is_rate_limit(exc) else _Refused)(exc) from None
        except DatabaseUnavailable:
            log.exception("database unavailable at a realtime gate (%s)", self.request_id)
            raise _Refused(unavailable()) from None
        held = _Held(hold, estimate, int(time.time()), caps)
        _track(services, held, running=True)
        return held

    def _cost(self, usage: Usage) -> int:
        try:
            return self.pricing.cost_micros(usage, self.uplift)
        except UnpricedModel:
            raise _Refused(model_not_priced(usage.model)) from None

    async def _refuse(self, error: GatewayError, event: Mapping[str, Any]) -> None:
        """Tell the client why (an `error` event), and close with 1008 and a readable reason
        (a rate limit only tells: the session goes on)."""
        await self._to_client(
            {
                "type": "websocket.send",
                "text": error_event(error, self.request_id, event.get("event_id")),
            }
        )
        if _is_rate_limit(error):
            return
        code = CLOSE_POLICY if error.status in (401, 403, 429) else CLOSE_INTERNAL
        await self._close_client(code, close_reason(error))

    # -- what the upstream sends ------------------------------------------

    def _on_server(self, kind: str, event: Mapping[str, Any]) -> None:
        """Note a watched server event; charge what it reports (in the background)."""
        meter = self.meter
        if kind == "error":
            self._refused_upstream(event.get("error"))
        elif kind in _SESSION_EVENTS:
            session = event.get("session")
            meter.configure(session)
            if kind.endswith(".created") and isinstance(session, Mapping):
                upstream_id = session.get("id")
                if isinstance(upstream_id, str) and upstream_id:
                    self.session_id = upstream_id
        elif kind == "response.created":
            response = event.get("response")
            response_id = response.get("id") if isinstance(response, Mapping) else None
            if isinstance(response_id, str):
                self._started(response_id, meter.response_estimate)
        elif kind == "response.done":
            response = event.get("response")
            if not isinstance(response, Mapping) or not isinstance(response.get("id"), str):
                return
            if response["id"] in self.charged:
                return
            self.charged.add(response["id"])
            held = self.running.pop(response["id"], None)
            usage = response_usage(meter.model, response)
            if usage is not None:
                meter.answered(usage)
            elif response.get("status") in ("failed", "cancelled"):
                if held is not None:
                    self._background(self._release(held))
                return
            status = "success" if response.get("status") == "completed" else "partial"
            if held is not None or usage is not None:
                self._background(self._charge(held, usage, response["id"], status))
        elif kind == "input_audio_buffer.committed":
            item_id = event.get("item_id")
            if isinstance(item_id, str) and meter.kind is SessionKind.TRANSCRIPTION:
                self._started(item_id, meter.transcription_estimate)
        elif kind == "conversation.item.input_audio_transcription.completed":
            item_id = event.get("item_id")
            if not isinstance(item_id, str) or item_id in self.charged:
                return
            self.charged.add(item_id)
            held = self.running.pop(item_id, None)
            model = meter.transcription_model or DEFAULT_TRANSCRIPTION_MODEL
            usage = transcription_usage(model, event.get("usage"))
            if held is not None or usage is not None:
                self._background(self._charge(held, usage, item_id, "success"))
        elif kind == "conversation.item.input_audio_transcription.failed":
            item_id = event.get("item_id")
            held = self.running.pop(item_id, None) if isinstance(item_id, str) else None
            if held is not None:
                self._background(self._release(held))
        if not self.running and not self.client_open:
            self._drained.set()

    def _started(self, upstream_id: str, estimate: Callable[[], Usage]) -> None:
        """The upstream started a response or transcription: give it its hold."""
        if self.waiting:
            held = self.waiting.popleft()
        elif self.ready is not None:
            held, self.ready = self.ready, None
        else:
            # Started by the upstream itself (voice detection): hold it now,
            # without holding up the relay; if it cannot be afforded, it is the last.
            held = _Held(None, estimate(), int(time.time()))
            held.late = self.services.spawn(self._hold_late(held), name="realtime:late-hold")
        self.running[upstream_id] = held

    async def _hold_late(self, held: _Held) -> None:
        """Hold a response the upstream started by itself. It is running already: rate
        limits do not stop it; the budget or a cap does (cancelled, the session ends)."""
        try:
            placed = await self._gate(held.estimate, self._cost(held.estimate), rates=False)
        except _Refused as refused:
            with contextlib.suppress(ConnectionClosed):
                if self.meter.kind is SessionKind.CONVERSATION:
                    await self.upstream.send(_dumps({"type": "response.cancel"}))
            await self._refuse(refused.error, {})
            return
        held.hold, held.caps = placed.hold, placed.caps

    def _background(self, work: Any) -> None:
        task = self.services.spawn(work, name=f"realtime-settle:{self.session_id}")
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    # -- charging ---------------------------------------------------------

    async def _charge(
        self, held: _Held | None, usage: Usage | None, upstream_id: str, status: str
    ) -> None:
        """One usage event for one upstream response or transcription, its hold replaced."""
        metering, metrics = self.services.metering, self.services.metrics
        if held is not None and held.late is not None:
            await held.late
        hold = held.hold if held is not None else None
        if usage is None:
            assert held is not None
            usage, status = held.estimate, "partial"
        request_id = f"rt:{self.session_id}:{upstream_id}"
        try:
            try:
                cost = self.pricing.cost_micros(usage, self.uplift)
            except UnpricedModel:
                # Checked before the session opened and at each session.update;
                # an answer naming another model is charged at its estimate.
                cost = self.pricing.cost_micros(held.estimate, self.uplift) if held else 0
            if hold is not None:
                settlement = await metering.settle(
                    replace(hold, request_id=request_id),
                    usage,
                    cost_micros=cost,
                    device_id=self.device_id,
                    status=status,
                    started_at=held.started_at if held else None,
                )
            else:
                # The upstream produced it without a hold (its own voice
                # detection, and the late hold was refused): still charged.
                settlement = await metering.record_usage(
                    self.license,
                    self.period,
                    usage,
                    cost_micros=cost,
                    request_id=request_id,
                    device_id=self.device_id,
                    status=status,
                )
            if held is not None and held.caps:
                await settle_limits(
                    self.services.limit_leases,
                    held.caps,
                    cost,
                    retry_seconds=metering.retry_seconds,
                )
            if settlement.event_id is not None:
                metrics.usage_cost.inc(cost)
                metrics.usage_events.labels(
                    str(usage.operation), str(usage.estimated).lower()
                ).inc()
            state = settlement.state
            if state is not None and state.snapshot.available_percent < 100 and hold is not None:
                self.services.schedule_auto_topup(
                    self.practice_id,
                    available_percent=state.snapshot.available_percent,
                    subscription_id=hold.license.subscription_id,
                )
        except Exception:
            log.exception("charging %s failed; its hold expires by itself", request_id)
        finally:
            if held is not None:
                _track(self.services, held, running=False)

    async def _release(self, held: _Held) -> None:
        if held.late is not None:
            await held.late
        await release_held(self.services, held)

    async def _finish(self) -> None:
        """At the session's end: charge what started without a usage report, release the rest."""
        try:
            for upstream_id, held in list(self.running.items()):
                await self._charge(held, None, upstream_id, "partial")
            self.running.clear()
            unused = [*self.waiting, *([self.ready] if self.ready else [])]
            self.waiting.clear()
            self.ready = None
            for held in unused:
                await self._release(held)
            if self._work:
                await asyncio.wait(list(self._work))
        finally:
            self.services.metrics.holds_in_flight.dec()


def _track(services: Services, held: _Held, *, running: bool) -> None:
    """Have the hold rows of a held response renewed while it is held (or no longer)."""
    if held.hold is None:
        return
    ids = [(services.metering.running, held.hold.hold_id)]
    ids += [(services.limits.running, cap.hold_id) for cap in held.caps if cap.lease is None]
    for renewed, hold_id in ids:
        if running:
            renewed.add(hold_id)
        else:
            renewed.discard(hold_id)


async def release_held(services: Services, held: _Held) -> None:
    """Drop a response's budget and cap holds without charging (they expire if this fails)."""
    hold, held.hold = held.hold, None
    if hold is None:
        return
    _track(services, replace(held, hold=hold), running=False)
    try:
        await services.metering.release(hold)
    except Exception:
        log.exception("releasing a realtime hold failed; it expires by itself")
    if held.caps:
        await release_limits(services.limit_leases, held.caps)


# -- opening a session ------------------------------------------------------


async def _deny(websocket: WebSocket, error: GatewayError, request_id: str) -> None:
    """Refuse the upgrade with the error as an HTTP response (the OpenAI error shape)."""
    response = error.response(request_id)
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:
        await websocket.close(CLOSE_POLICY, close_reason(error))


def _session_kind(websocket: WebSocket, pricing: Pricing, max_output_tokens: int) -> SessionMeter:
    query = websocket.query_params
    if query.get("intent") == "transcription":
        pricing.check(DEFAULT_TRANSCRIPTION_MODEL)
        return SessionMeter(
            SessionKind.TRANSCRIPTION,
            model=DEFAULT_TRANSCRIPTION_MODEL,
            transcription_model=DEFAULT_TRANSCRIPTION_MODEL,
        )
    model = query.get("model")
    if not model:
        raise bad_request(
            "A Realtime session needs ?model=… (or ?intent=transcription).",
            code="missing_model",
            param="model",
        )
    pricing.check(model)
    # A response's output is held at the gateway's default limit until the
    # session or the response names one (Realtime's own default is "inf").
    return SessionMeter(SessionKind.CONVERSATION, model=model, max_output_tokens=max_output_tokens)


def _choose_upstream(services: Services, practice_id: str, model: str) -> Upstream:
    """The upstream a session goes to: the first OpenAI-kind one serving `model` in the
    practice's regions (Azure's Realtime endpoint takes another URL scheme: not served)."""
    route = services.router.route(model, services.residency.regions_for(practice_id))
    for upstream in route.upstreams:
        if upstream.config.kind == "openai":
            return upstream
    raise no_upstream_serves(route)


def realtime_url(base_url: str) -> str:
    """An upstream's Realtime WebSocket URL: its base URL as ws(s):// plus /realtime."""
    base = base_url.rstrip("/")
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if base.startswith(http):
            return ws + base[len(http) :] + "/realtime"
    return base + "/realtime"


def egress_proxy(settings: Settings, url: str) -> str | None:
    """The proxy a wss:// upstream is reached through, as an https one over HTTP."""
    if not settings.https_proxy or not url.startswith("wss://"):
        return None
    host = urlsplit(url).hostname or ""
    return None if NoProxy(settings.no_proxy).bypass(host) else settings.https_proxy


async def _connect_upstream(
    upstream: Upstream, websocket: WebSocket, settings: Settings
) -> ClientConnection:
    url = realtime_url(upstream.config.base_url)
    proxy = egress_proxy(settings, url)
    query = websocket.scope.get("query_string", b"").decode("latin-1")
    if query:
        url += "?" + query
    headers = {
        name: websocket.headers[name] for name in _FORWARDED_HEADERS if name in websocket.headers
    }
    if upstream.auth is not None:
        name, value = upstream.auth
        headers[name.decode("latin-1")] = value.decode("latin-1")
    try:
        return await connect(
            url,
            additional_headers=headers,
            max_size=None,
            compression=None,
            open_timeout=10,
            user_agent_header=None,
            # The egress proxy as for HTTP (HTTPS_PROXY unless NO_PROXY names the
            # host), from the settings: websockets would read the environment at
            # every connect otherwise.
            proxy=proxy,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 401:
            log.warning("upstream refused the upstream API key on the Realtime route (401)")
            raise GatewayError(
                502,
                "The upstream API refused the gateway's own credentials; the operator must fix "
                "OPENAI_API_KEY.",
                type="server_error",
                code="upstream_auth_failed",
            ) from None
        raise _UpstreamAnswer(status, exc.response.body or b"") from None
    except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
        log.warning("upstream Realtime endpoint unreachable: %s", exc)
        raise upstream_unreachable() from None


class _UpstreamAnswer(Exception):
    """The upstream refused the upgrade with an HTTP answer, passed on to the client."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


class RealtimeEndpoint:
    """The `/v1/realtime` WebSocket route (an ASGI app for starlette's WebSocketRoute)."""

    def __init__(self, services: Callable[[], Services]) -> None:
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = self.services()
        websocket = WebSocket(scope, receive, send)
        request_id = new_request_id()
        pricing = services.pricing
        first: _Held | None = None
        try:
            caller = await services.auth.authenticate(websocket.headers)
            practice_id = require_practice(caller)
            meter = _session_kind(websocket, pricing, services.settings.default_max_output_tokens)
            estimate = (
                meter.transcription_estimate()
                if meter.kind is SessionKind.TRANSCRIPTION
                else meter.response_estimate()
            )
            chosen = _choose_upstream(services, practice_id, estimate.model)
            subjects = await limit_subjects(services, caller, practice_id)
            hold, caps = await admit_response(
                services,
                practice_id,
                subjects,
                f"rt:{request_id}:hold0",
                estimate,
                pricing.cost_micros(estimate, chosen.uplift),
            )
            first = _Held(hold, estimate, int(time.time()), caps)
            _track(services, first, running=True)
            upstream = await _connect_upstream(chosen, websocket, services.settings)
        except BaseException as exc:
            if first is not None:
                # In a task of its own: a cancellation (the client gone) cannot stop it.
                await asyncio.shield(
                    services.spawn(release_held(services, first), name="realtime:unopened")
                )
            if not isinstance(exc, GatewayError | _UpstreamAnswer | DatabaseUnavailable):
                raise
            if isinstance(exc, _UpstreamAnswer):
                await websocket.send_denial_response(
                    Response(exc.body, status_code=exc.status, media_type="application/json")
                )
                return
            error = exc if isinstance(exc, GatewayError) else unavailable()
            await _deny(websocket, error, request_id)
            return
        try:
            await websocket.accept()
        except BaseException:
            await upstream.close()
            await asyncio.shield(
                services.spawn(release_held(services, first), name="realtime:unopened")
            )
            raise
        session = RealtimeSession(
            services,
            practice_id=practice_id,
            device_id=caller.device_id,
            request_id=request_id,
            meter=meter,
            first=first,
            receive=receive,
            send=send,
            upstream=upstream,
            uplift=chosen.uplift,
            headers=websocket.headers,
        )
        await session.run()


# -- ephemeral keys -----------------------------------------------------------


def ephemeral_keys_refused() -> GatewayError:
    return forbidden(
        "Ephemeral Realtime keys are turned off at this gateway: a browser holding one talks "
        "to OpenAI directly, past the practice's budget. Connect to the gateway's WebSocket "
        "route instead (wss://<gateway>/v1/realtime?model=…, e.g. client.realtime.connect() "
        "with the gateway key), or ask the operator to allow them "
        "(AZA_REALTIME_EPHEMERAL_KEYS).",
        code="realtime_ephemeral_keys_disabled",
    )


def calls_refused() -> GatewayError:
    return forbidden(
        "Realtime calls over WebRTC or SIP are not relayed by this gateway: their audio "
        "flows between the caller and OpenAI, past the practice's budget. Connect to the "
        "gateway's WebSocket route instead (wss://<gateway>/v1/realtime?model=…, e.g. "
        "client.realtime.connect() with the gateway key).",
        code="realtime_calls_not_relayed",
    )


async def _refuse_call(request: Request) -> Response:
    request_id = request_id_of(request.scope)
    return calls_refused().response(request_id)


class EphemeralKeys:
    """`POST /v1/realtime/client_secrets` (and the beta session routes).

    Refused with 403 unless `Settings.realtime_ephemeral_keys`; then each is
    held and charged at `realtime_session_cap_usd`, a fixed approximation of
    a session the gateway never sees, and forwarded.
    """

    def __init__(self, services: Callable[[], Services]) -> None:
        self.services = services

    async def handle(self, request: Request) -> Response:
        services = self.services()
        settings = services.settings
        request_id = request_id_of(request.scope)
        cap = settings.realtime_session_cap_usd
        try:
            if not settings.realtime_ephemeral_keys or cap is None:
                raise ephemeral_keys_refused()
            caller = await services.auth.authenticate(request.headers)
            practice_id = require_practice(caller)
            body = await read_bounded_body(request.scope, request.receive, 1_048_576)
            model = _model_of(body)
            chosen = _choose_upstream(services, practice_id, model)
            cap_micros = usd_to_micros(Decimal(cap))
            estimate = Usage(Operation.REALTIME, model, estimated=True)
            subjects = await limit_subjects(services, caller, practice_id)
            hold, caps = await admit_response(
                services, practice_id, subjects, request_id, estimate, cap_micros
            )
        except GatewayError as exc:
            return exc.response(request_id)
        except DatabaseUnavailable:
            return unavailable().response(request_id)
        held = _Held(hold, estimate, int(time.time()), caps)
        response = None
        try:
            response = await chosen.client.send(
                "POST",
                request.url.path[len("/v1") :],
                headers=upstream_request_headers(request.scope["headers"], chosen.auth),
                content=body,
            )
            answer = await response.aread()
            await response.aclose()
        except BaseException as exc:
            # Settled or released in a task of its own, which a cancellation (the
            # server shutting down) cannot stop: a key the upstream issued is
            # charged, else the hold goes back rather than waiting to expire.
            issued = response is not None and 200 <= response.status_code < 300
            work = self._charge(services, held, cap_micros, caller.device_id) if issued else None
            task = services.spawn(work or release_held(services, held), name="realtime-key:settle")
            if isinstance(exc, Exception):
                await asyncio.shield(task)
            if isinstance(exc, UpstreamError):
                return upstream_unreachable().response(request_id)
            raise
        if 200 <= response.status_code < 300:
            work = self._charge(services, held, cap_micros, caller.device_id)
        else:
            work = release_held(services, held)
        await asyncio.shield(services.spawn(work, name="realtime-key:settle"))
        headers = dict(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in client_response_headers(response.headers)
            if name != b"content-length"
        )
        return Response(answer, status_code=response.status_code, headers=headers)

    @staticmethod
    async def _charge(
        services: Services, held: _Held, cost_micros: int, device_id: str | None
    ) -> None:
        """The key's fixed charge as one usage event, its cap holds settled with it."""
        assert held.hold is not None
        try:
            await services.metering.settle(
                held.hold,
                held.estimate,
                cost_micros=cost_micros,
                device_id=device_id,
                status="success",
            )
            if held.caps:
                await settle_limits(
                    services.limit_leases,
                    held.caps,
                    cost_micros,
                    retry_seconds=services.metering.retry_seconds,
                )
        except Exception:
            log.exception("charging an ephemeral key failed; its hold expires by itself")


def _model_of(body: bytes) -> str:
    data = _parse(body.decode("utf-8", errors="replace")) or {}
    session = data.get("session")
    model = session.get("model") if isinstance(session, Mapping) else data.get("model")
    return model if isinstance(model, str) and model else "gpt-realtime"


def realtime_routes(services: Callable[[], Services]) -> list[Route | WebSocketRoute]:
    """The Realtime routes: the WebSocket, and the ephemeral-key routes (403 by default)."""
    keys = EphemeralKeys(services)
    return [
        WebSocketRoute(REALTIME_PATH, RealtimeEndpoint(services)),
        *(Route(path, keys.handle, methods=["POST"]) for path in EPHEMERAL_KEY_PATHS),
        *(Route(path, _refuse_call, methods=["POST"]) for path in CALL_PATHS),
    ]
