"""POST /v1/stripe/webhook: Stripe's signed events, verified against the raw body."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.errors import GatewayError
from gateway.routes.common import endpoint, ok, services_of

log = logging.getLogger("aza.stripe")


@endpoint
async def stripe_webhook(request: Request) -> Response:
    """Verify, process once, acknowledge; a failure answers 500 so Stripe retries."""
    from credit.service import WebhookSignatureError

    credit = services_of(request).credit
    payload = await request.body()
    signature = request.headers.get("stripe-signature")
    try:
        result = await credit.handle_webhook(payload, signature)
    except WebhookSignatureError:
        raise
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
