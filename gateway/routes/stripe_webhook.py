"""POST /v1/stripe/webhook: Stripe's signed events, verified against the raw body."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from credit.errors import CreditError
from credit.ports import DatabaseUnavailable
from credit.stripe_port import StripeUnavailable
from gateway.errors import GatewayError
from gateway.routes.common import endpoint, ok, services_of

log = logging.getLogger("aza.stripe")


@endpoint
async def stripe_webhook(request: Request) -> Response:
    """Verify, process once, acknowledge.

    What Stripe sent wrong (signature, a body that is not an event) is a
    4xx, which Stripe does not retry; what is ours to fix or wait for (no
    webhook secret, the database or Stripe unreachable) is a 503, which it
    retries; anything else a 500. The body was bounded by the body limit
    before it was read (gateway/limits.py).
    """
    credit = services_of(request).credit
    payload = await request.body()
    signature = request.headers.get("stripe-signature")
    try:
        result = await credit.handle_webhook(payload, signature)
    except (CreditError, DatabaseUnavailable):
        raise  # mapped once, by `endpoint`
    except StripeUnavailable as exc:
        log.warning("stripe webhook: Stripe unavailable (%s); Stripe will retry", exc)
        raise GatewayError(
            503,
            "Stripe could not be reached while processing the webhook; Stripe will retry.",
            type="server_error",
            code="stripe_unavailable",
        ) from None
    except Exception:
        # The handler's transaction rolled back and the event id was not
        # recorded: Stripe's retry will find a clean state.
        log.exception("stripe webhook handler failed")
        raise GatewayError(
            500,
            "The webhook could not be processed; Stripe will retry.",
            type="server_error",
            code="webhook_failed",
        ) from None
    return ok(result)


routes: list[BaseRoute] = [Route("/v1/stripe/webhook", stripe_webhook, methods=["POST"])]
