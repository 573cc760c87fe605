"""Operations routes: liveness, readiness (the database answers) and Prometheus metrics."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.errors import unavailable
from gateway.services import Services

log = logging.getLogger("aza.gateway.health")


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def healthz(request: Request) -> Response:
    """The process is up; touches neither the database nor the upstream."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready to serve: the database answers (503 in the OpenAI error shape when not)."""
    try:
        await _services(request).db.ping()
    except Exception as exc:
        log.warning("readiness check failed: %r", exc)
        return unavailable().response(request.scope.get("state", {}).get("request_id"))
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    services = _services(request)
    return Response(services.metrics.render(), media_type=services.metrics.content_type)


routes: list[BaseRoute] = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
