"""The gateway's own routes (everything that is not forwarded upstream).

Operations routes always; the credit, admin and Stripe webhook routes when
their modules import (they need `credit.service`).
"""

from __future__ import annotations

import importlib
import logging

from starlette.routing import BaseRoute

from gateway.routes import health

log = logging.getLogger("aza.gateway.routes")

_OPTIONAL = ("gateway.routes.credit", "gateway.routes.admin", "gateway.routes.stripe_webhook")


def all_routes() -> list[BaseRoute]:
    """Every route the app serves itself."""
    routes: list[BaseRoute] = list(health.routes)
    for name in _OPTIONAL:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only a missing module is optional; a broken one must fail loudly.
            if exc.name != name and not (exc.name or "").startswith("credit."):
                raise
            log.warning("routes %s not available: %s", name, exc)
            continue
        routes.extend(module.routes)
    return routes
