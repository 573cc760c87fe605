"""`PUT`/`GET /v1/admin/practices/{id}/regions` (service token): a practice's data residency.

Body of PUT: `{"regions": ["ch"], "store": "deny"}`, each field optional (a
field left out stays as it was; `null` goes back to the gateway's default).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.errors import unprocessable
from gateway.residency import PracticeResidency
from gateway.routes.common import endpoint, json_body, ok, service_caller, services_of
from gateway.storage.residency import UNCHANGED, ResidencyStore
from gateway.upstreams_config import valid_region

_FIELDS = ("regions", "store")


def _view(request: Request, practice_id: str, own: PracticeResidency) -> dict[str, Any]:
    residency = services_of(request).residency
    effective = residency.regions_for(practice_id)
    return {
        "ok": True,
        "practice_id": practice_id,
        "regions": sorted(own.regions) if own.regions is not None else None,
        "store": own.store,
        # What applies now, the gateway's defaults filled in (null regions: any).
        "effective_regions": sorted(effective) if effective is not None else None,
        "effective_store": "allow" if residency.store_allowed(practice_id) else "deny",
    }


@endpoint
async def get_regions(request: Request) -> Response:
    """GET: the practice's own setting and what applies to it."""
    await service_caller(request)
    practice_id = str(request.path_params["practice_id"])
    return ok(_view(request, practice_id, services_of(request).residency.own(practice_id)))


@endpoint
async def put_regions(request: Request) -> Response:
    """PUT: change the practice's regions and/or store rule."""
    await service_caller(request)
    practice_id = str(request.path_params["practice_id"])
    data = await json_body(request)
    for key in data:
        if key not in _FIELDS:
            raise unprocessable(
                f"Unknown field '{key}': the body may hold 'regions' and 'store'.",
                code="unknown_field",
                param=key,
            )
    regions: Any = UNCHANGED
    if "regions" in data:
        raw = data["regions"]
        if raw is not None:
            if (
                not isinstance(raw, list)
                or not raw
                or not all(isinstance(r, str) and valid_region(r) for r in raw)
            ):
                raise unprocessable(
                    "'regions' must be a non-empty list of region labels such as "
                    '["ch"] or ["ch", "eu"], or null for the gateway default.',
                    code="invalid_regions",
                    param="regions",
                )
            regions = frozenset(raw)
        else:
            regions = None
    store: Any = UNCHANGED
    if "store" in data:
        store = data["store"]
        if store not in ("allow", "deny", None):
            raise unprocessable(
                '\'store\' must be "allow", "deny" or null (the gateway default).',
                code="invalid_store",
                param="store",
            )
    services = services_of(request)
    setting = await ResidencyStore(services.db).put(practice_id, regions=regions, store=store)
    services.residency.set(practice_id, setting)
    return ok(_view(request, practice_id, setting))


routes: list[BaseRoute] = [
    Route("/v1/admin/practices/{practice_id}/regions", get_regions, methods=["GET"]),
    Route("/v1/admin/practices/{practice_id}/regions", put_regions, methods=["PUT"]),
]
