"""The ASGI app: `create_app(settings)` wires routes, middleware and the lifespan.

Request path, outermost first: request context (id, metrics) → metering
(auth, budget gate, usage tap), which hands the OpenAI API paths to the proxy
itself → body limit (gateway/limits.py) → router, for the gateway's own
routes (and 404/405 in the OpenAI shape, also for a proxied path asked
with the wrong method). Shared resources (database, upstream client,
credit service, background maintenance) are made in the lifespan and closed after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from budget.operations import methods_by_template
from gateway.auth import Authenticator
from gateway.background import BackgroundResponses
from gateway.batches import BatchService, files_and_batches_app
from gateway.errors import GatewayError, not_found
from gateway.limit_leases import LimitLeases
from gateway.limits import BodyLimitMiddleware, files_body_limit
from gateway.metrics import GatewayMetrics
from gateway.middleware import MeteringMiddleware
from gateway.pricing import Pricing
from gateway.proxy import Proxy
from gateway.realtime import realtime_routes
from gateway.request_context import RequestContextMiddleware
from gateway.residency import Residency
from gateway.routes import all_routes
from gateway.services import Services, build_alerts, build_credit, build_router
from gateway.settings import Settings
from gateway.storage import AnyDatabase, open_database
from gateway.storage.limits import LimitStore
from gateway.storage.metering import MeteringStore
from gateway.storage.residency import ResidencyStore

log = logging.getLogger("aza.gateway")


def _request_id(request: Request) -> str | None:
    value = request.scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in the OpenAI error shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = not_found(f"Unknown path: {request.method} {request.url.path}")
    else:
        error = GatewayError(
            exc.status_code,
            str(exc.detail),
            type="invalid_request_error",
            code="method_not_allowed" if exc.status_code == 405 else None,
        )
    return error.response(_request_id(request))


async def _not_forwarded(request: Request) -> Response:
    """A forwarded path with a method the endpoint table does not forward (HEAD): 405."""
    raise HTTPException(405, f"Method {request.method} is not allowed on {request.url.path}.")


def create_app(
    settings: Settings,
    *,
    database: AnyDatabase | None = None,
    maintenance_interval: float = 60.0,
    background_poll_seconds: float = 5.0,
) -> Starlette:
    """The gateway app for `settings`.

    `database`: an already open (and migrated) database to use and leave
    open; by default the app opens `settings.database_url` at start and
    closes it at shutdown.
    """
    holder: dict[str, Services] = {}

    def services() -> Services:
        return holder["services"]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = database
        if db is None:
            db = await open_database(
                settings.database_url,
                pool_size=settings.database_pool_size,
                sqlite_synchronous=settings.sqlite_synchronous,
            )
        metering = MeteringStore(
            db,
            plans=settings.plans,
            hold_ttl_seconds=settings.hold_ttl_seconds,
            period_grace_seconds=settings.period_grace_seconds,
            lease_requests=settings.gate_lease_requests,
            lease_seconds=settings.gate_lease_seconds,
        )
        credit, stripe = build_credit(settings, db)
        residency = Residency(
            default_regions=settings.default_regions,
            store_allowed=settings.upstream_store_allowed,
            practices=await ResidencyStore(db).load_all(),
        )
        router = build_router(settings)
        alerts, dispatcher = build_alerts(settings, db)
        limits = LimitStore(
            db,
            hold_ttl_seconds=settings.hold_ttl_seconds,
            cache_seconds=settings.auth_cache_seconds,
        )
        current = Services(
            settings=settings,
            db=db,
            metering=metering,
            auth=Authenticator(
                lookup=metering.identify_key,
                service_token=settings.api_token,
                cache_seconds=settings.auth_cache_seconds,
            ),
            router=router,
            residency=residency,
            metrics=metrics,
            credit=credit,
            alerts=alerts,
            dispatcher=dispatcher,
            limits=limits,
            limit_leases=LimitLeases(
                limits,
                lease_seconds=settings.gate_lease_seconds,
                retry_seconds=metering.retry_seconds,
            ),
            pricing=Pricing(settings),
        )
        holder["services"] = current
        app.state.services = current
        files_batches = BatchService(current)
        app.state.files_batches = files_batches
        files_batches.start()
        background_responses = BackgroundResponses(
            current, price=current.pricing.cost_micros, poll_seconds=background_poll_seconds
        )
        app.state.background_responses = background_responses
        background_responses.start()
        background = [
            asyncio.create_task(current.maintenance_loop(maintenance_interval), name="maintenance"),
            asyncio.create_task(dispatcher.run(), name="alerts"),
        ]
        background.append(asyncio.create_task(current.hold_renewal_loop(), name="hold renewal"))
        background.append(
            asyncio.create_task(
                current.residency_loop(max(settings.auth_cache_seconds, 1.0)), name="residency"
            )
        )
        if db.dialect == "postgresql":
            background.append(asyncio.create_task(current.holds_vacuum_loop(), name="holds vacuum"))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await files_batches.aclose()
            await background_responses.aclose()
            await current.drain()
            await current.limit_leases.aclose()
            await metering.aclose()
            await router.aclose()
            await dispatcher.webhooks.aclose()
            if stripe is not None:
                await stripe.aclose()
            if database is None:
                await db.close()

    metrics = GatewayMetrics()
    proxy = Proxy(services=services, settings=settings, metrics=lambda: metrics)
    # The router only sees a forwarded path asked with a method it is not
    # forwarded for (the middleware hands the others to the proxy): 405.
    # Its endpoint is never the proxy: Starlette answers HEAD on a GET route,
    # and a HEAD must not reach the upstream unauthenticated.
    proxied = [
        Route(template, _not_forwarded, methods=methods)
        for template, methods in methods_by_template().items()
    ]
    app = Starlette(
        routes=[*proxied, *realtime_routes(services), *all_routes()],
        middleware=[
            Middleware(RequestContextMiddleware, services=lambda: holder.get("services")),
            Middleware(
                MeteringMiddleware,
                services=services,
                proxy=proxy,
                own=BodyLimitMiddleware(files_and_batches_app(), limit_for=files_body_limit),
            ),
            # Only the gateway's own routes get here: metering bounds what it reads itself.
            Middleware(BodyLimitMiddleware),
        ],
        exception_handlers={404: _http_error, 405: _http_error},
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    metrics.count_leases(lambda: services().metering.lease_counts if holder else {})
    metrics.count_upstreams(lambda: services().router.upstreams if holder else ())
    return app
