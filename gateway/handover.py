"""The hand-over between the metering middleware and what serves a matched request.

`MeteringMiddleware` matches a request against the endpoint table, and from
then on one `Handover` is everything it shares about that request with the
proxy (`Proxy.forward` gets it as an argument), with the gateway's own
Files and Batch handlers and with the request context middleware (both read
it from the request scope, the one key `HANDOVER` of `scope["state"]`).
Besides the request id (`scope["state"]["request_id"]`, from the request
context middleware), nothing else about a request passes between them.

It is mutable because it fills as the request goes on (a stream cut short
must still settle at the upstream that answered); one object per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.types import Scope

from gateway.auth import Caller, require_practice

if TYPE_CHECKING:
    from budget.operations import Match
    from gateway.routing import Route, Upstream

# The key of `scope["state"]` that holds a matched request's `Handover`.
HANDOVER = "aza.handover"


@dataclass(slots=True, eq=False)
class Handover:
    """One matched request, as the metering middleware hands it on.

    Each field says who writes it and who reads it.
    """

    # The endpoint table's match. Written by the middleware when the path
    # matches; read by the proxy (the upstream path is built from it) and by
    # the metrics' path label (its template).
    match: Match
    # The caller, once authenticated with a practice (the middleware). The
    # proxy refuses a request without one; Files and Batch handlers read
    # their practice from it.
    caller: Caller | None = None
    # True once the middleware read the body, bounded; the proxy does not
    # count it again (a rewritten body may be a little longer).
    body_checked: bool = False
    # The upstreams the request may go to (the middleware); the proxy's
    # default route when None.
    route: Route | None = None
    # The upstream whose answer the client got, written by the proxy as soon
    # as it answered; the middleware settles at its uplift, under its name.
    answered_by: Upstream | None = None


def handover_of(scope: Scope) -> Handover | None:
    """The request's hand-over, if the metering middleware matched it."""
    found: Handover | None = scope.get("state", {}).get(HANDOVER)
    return found


def caller_of(scope: Scope) -> Caller:
    """The authenticated caller of a request the middleware handed on."""
    handover = handover_of(scope)
    caller = handover.caller if handover is not None else None
    if caller is None:
        raise RuntimeError("only the metering middleware, after authentication, hands requests on")
    return caller


def practice_of(scope: Scope) -> str:
    """The authenticated practice of a request the middleware handed on (403 without one)."""
    return require_practice(caller_of(scope))
