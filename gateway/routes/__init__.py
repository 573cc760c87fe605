"""The gateway's own routes (everything that is not forwarded upstream)."""

from __future__ import annotations

from starlette.routing import BaseRoute

from gateway.console import routes as console
from gateway.routes import (
    admin,
    alerts,
    credit,
    health,
    limits,
    residency,
    stripe_webhook,
    usage,
)


def all_routes() -> list[BaseRoute]:
    """Every route the app serves itself."""
    return [
        *health.routes,
        *credit.routes,
        *usage.routes,
        *alerts.routes,
        *limits.routes,
        *admin.routes,
        *residency.routes,
        *stripe_webhook.routes,
        *console.routes,
    ]
