"""The Files and Uploads APIs through the gateway, each object visible to its practice only.

`POST /v1/files`, `GET /v1/files`, `GET /v1/files/{id}`, `GET
/v1/files/{id}/content`, `DELETE /v1/files/{id}` and `/v1/uploads` (create,
parts, complete, cancel) are forwarded to the upstream with the gateway's
key. Uploaded bodies are streamed to the upstream as they arrive (never
held whole: a file may be up to OpenAI's 512 MB), and so is a file's
content on the way back. The gateway records which practice owns every
file and upload id the upstream hands out (`BatchStore.record`): a practice
lists only its own files, and another practice's id answers 404 exactly as
an id that does not exist. Files cost nothing (docs/metering.md).

These calls go through httpx, not the proxy's own client: they need request
bodies streamed with backpressure, and they are not on the hot path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.errors import GatewayError, bad_request
from gateway.handover import practice_of
from gateway.proxy import (
    read_bounded_body,
    upstream_refused_credentials,
    upstream_timeout,
    upstream_unreachable,
)
from gateway.routing import Upstream
from gateway.storage.batches import FILE, UPLOAD
from gateway.upstream import NoProxy

if TYPE_CHECKING:
    from gateway.batches import BatchService
    from gateway.services import Services

log = logging.getLogger("aza.gateway.files")

# OpenAI's limit of an upload part (the file limit is Settings.max_file_bytes);
# a body may exceed them by the multipart framing around the data.
MAX_PART_BYTES = 64 * 1024 * 1024
_FRAMING_BYTES = 1024 * 1024
# Items asked of the upstream per page while a listing is filtered by owner.
_LIST_PAGE = 100
_MAX_LIST = 10_000
# A listing's default `limit` and the most the upstream lists at once, as OpenAI's
# (files: 10,000 and 10,000; batches: 20 and 100).
_LIST_DEFAULT = {"/files": 10_000, "/batches": 20}
_UPSTREAM_PAGE_MAX = {"/files": 10_000, "/batches": 100}


def no_such(kind: str, object_id: str, *, param: str = "id", status: int = 404) -> GatewayError:
    """What OpenAI answers for an id it does not know (also another practice's id)."""
    return GatewayError(
        status, f"No such {kind}: {object_id}", type="invalid_request_error", param=param
    )


def file_too_large(limit: int, what: str = "file") -> GatewayError:
    return bad_request(
        f"The {what} is too large: the limit is {limit} bytes.", code="file_too_large", param="file"
    )


class _TooLarge(Exception):
    pass


@dataclass
class FilesUpstream:
    """httpx clients to the upstreams for files and batches, one per upstream, made when first
    used; closed with `aclose()`."""

    services: Services

    def __post_init__(self) -> None:
        self._clients: dict[str, httpx.AsyncClient] = {}

    def upstream_for(self, practice_id: str) -> Upstream:
        """The upstream a practice's files and batches live at: the first OpenAI-kind
        upstream its residency allows (files cannot move between upstreams)."""
        services = self.services
        route = services.router.route(None, services.residency.regions_for(practice_id))
        for upstream in route.upstreams:
            if upstream.config.kind == "openai":
                return upstream
        raise GatewayError(
            503,
            "No upstream for files and batches is configured for this practice's region.",
            type="server_error",
            code="no_upstream",
        )

    def client(self, practice_id: str) -> httpx.AsyncClient:
        upstream = self.upstream_for(practice_id)
        client = self._clients.get(upstream.name)
        if client is None:
            settings = self.services.settings
            config = upstream.config
            # Bodies come as the upstream sent them (a file's content is streamed on raw),
            # so none may come encoded, as on the proxy's path.
            headers = {"accept-encoding": "identity"}
            if upstream.auth is not None:
                headers[upstream.auth[0].decode()] = upstream.auth[1].decode("latin-1")
            proxy = None
            host = httpx.URL(config.base_url).host
            if settings.https_proxy and not NoProxy(settings.no_proxy).bypass(host):
                proxy = settings.https_proxy
            client = httpx.AsyncClient(
                base_url=config.base_url.rstrip("/"),
                headers=headers,
                timeout=httpx.Timeout(settings.upstream_timeout_seconds, connect=10.0),
                proxy=proxy,
                follow_redirects=False,
            )
            self._clients[upstream.name] = client
        return client

    async def send(
        self,
        practice_id: str,
        method: str,
        path: str,
        *,
        params: Any = None,
        content: Any = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """One upstream call (path below /v1); upstream failures as the proxy reports them."""
        client = self.client(practice_id)
        request = client.build_request(
            method, path, params=params, content=content, headers=headers
        )
        try:
            response = await client.send(request, stream=stream)
        except _TooLarge:
            raise
        except httpx.TimeoutException:
            raise upstream_timeout() from None
        except httpx.HTTPError as exc:
            if isinstance(exc.__cause__, _TooLarge) or isinstance(exc.__context__, _TooLarge):
                raise _TooLarge from None
            log.warning("upstream unreachable for %s %s: %s", method, path, type(exc).__name__)
            raise upstream_unreachable() from None
        if response.status_code == 401:
            await response.aclose()
            raise upstream_refused_credentials()
        return response

    async def json(self, practice_id: str, method: str, path: str, **kw: Any) -> httpx.Response:
        response = await self.send(practice_id, method, path, **kw)
        await response.aread()
        return response

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def passthrough(response: httpx.Response) -> Response:
    """An upstream answer (read whole: a JSON object) as the client gets it."""
    return Response(
        response.content,
        status_code=response.status_code,
        media_type=response.headers.get("content-type", "application/json"),
    )


def json_of(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = None
    return data if isinstance(data, dict) else {}


async def lines_of(response: httpx.Response, *, limit: int | None = None) -> AsyncIterator[bytes]:
    """The lines of a streamed body (without newlines); _TooLarge past `limit` bytes."""
    pending = b""
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if limit is not None and size > limit:
            raise _TooLarge
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.rstrip(b"\r")
    if pending:
        yield pending.rstrip(b"\r")


# A JSON body of these routes (an upload's or batch's description) is small.
MAX_JSON_BODY_BYTES = 1024 * 1024


async def small_body(request: Request, limit: int = MAX_JSON_BODY_BYTES) -> bytes:
    """A JSON request body, refused (413) as soon as it exceeds `limit` bytes."""
    return await read_bounded_body(request.scope, request.receive, limit)


def practice_of_scope(request: Request) -> str:
    """The practice the metering middleware authenticated (gateway/handover.py)."""
    return practice_of(request.scope)


def service_of(request: Request) -> BatchService:
    service: BatchService = request.app.state.files_batches
    return service


async def streamed_upload(
    request: Request, service: BatchService, practice_id: str, path: str, *, limit: int
) -> httpx.Response:
    """Stream the request body to the upstream, refused (400) past `limit` bytes."""
    declared = request.headers.get("content-length")
    # The limit is the file's; the body may exceed it by the multipart framing.
    body_limit = limit + _FRAMING_BYTES
    if declared is not None and declared.isdigit() and int(declared) > body_limit:
        raise file_too_large(limit)
    counted = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal counted
        async for chunk in request.stream():
            counted += len(chunk)
            if counted > body_limit:
                raise _TooLarge
            yield chunk

    headers = {"content-type": request.headers.get("content-type", "")}
    if declared is not None:
        headers["content-length"] = declared
    try:
        return await service.upstream.json(
            practice_id, "POST", path, content=body(), headers=headers
        )
    except _TooLarge:
        raise file_too_large(limit) from None


async def owned_listing(
    request: Request, path: str, object_type: str, practice_id: str
) -> dict[str, Any]:
    """An upstream cursor listing filtered to the practice's own objects."""
    service = service_of(request)
    query = request.query_params
    limit_text = query.get("limit", str(_LIST_DEFAULT[path]))
    # isdigit() alone accepts "²" and other digits int() refuses.
    if not (limit_text.isascii() and limit_text.isdigit()) or not 1 <= int(limit_text) <= _MAX_LIST:
        raise bad_request(f"limit must be from 1 to {_MAX_LIST}", param="limit")
    want = int(limit_text)
    params = {key: value for key, value in query.items() if key != "limit"}
    # One more than asked for is looked for: whether it exists is `has_more` (the
    # upstream's own says only that other practices' objects follow).
    data: list[dict[str, Any]] = []
    # Pages grow while other practices' objects fill them, so a sparse practice's list
    # takes few upstream calls.
    page_size = min(max(want + 1, _LIST_PAGE), _UPSTREAM_PAGE_MAX[path])
    while True:
        params["limit"] = str(page_size)
        page_size = min(page_size * 4, _UPSTREAM_PAGE_MAX[path])
        response = await service.upstream.json(practice_id, "GET", path, params=params)
        if response.status_code != 200:
            raise _Passthrough(response)
        page = json_of(response)
        items = [item for item in page.get("data", []) if isinstance(item, dict)]
        owned = await service.store.owned(
            practice_id, object_type, (str(item.get("id")) for item in items)
        )
        data.extend(item for item in items if item.get("id") in owned)
        if len(data) > want or not page.get("has_more") or not items:
            break
        params["after"] = str(items[-1].get("id"))
    has_more = len(data) > want
    del data[want:]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0].get("id") if data else None,
        "last_id": data[-1].get("id") if data else None,
        "has_more": has_more,
    }


class _Passthrough(Exception):
    """An upstream error answer to hand to the client as it is."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


# -- files --------------------------------------------------------------------


async def create_file(request: Request) -> Response:
    """POST /v1/files: the multipart body streamed upstream; the new file id is the practice's."""
    practice_id = practice_of_scope(request)
    service = service_of(request)
    limit = service.services.settings.max_file_bytes
    response = await streamed_upload(request, service, practice_id, "/files", limit=limit)
    if response.status_code == 200:
        file_id = json_of(response).get("id")
        if isinstance(file_id, str):
            await service.store.record(file_id, FILE, practice_id)
    return passthrough(response)


async def list_files(request: Request) -> Response:
    """GET /v1/files: the upstream's list, only the practice's own files."""
    practice_id = practice_of_scope(request)
    try:
        page = await owned_listing(request, "/files", FILE, practice_id)
    except _Passthrough as exc:
        return passthrough(exc.response)
    return Response(json.dumps(page), media_type="application/json")


async def _owned_file(request: Request) -> tuple[BatchService, str, str]:
    practice_id = practice_of_scope(request)
    service = service_of(request)
    file_id = request.path_params["file_id"]
    if not await service.store.owns(practice_id, FILE, file_id):
        raise no_such("File", file_id)
    return service, practice_id, file_id


async def retrieve_file(request: Request) -> Response:
    service, practice_id, file_id = await _owned_file(request)
    return passthrough(await service.upstream.json(practice_id, "GET", f"/files/{file_id}"))


async def delete_file(request: Request) -> Response:
    service, practice_id, file_id = await _owned_file(request)
    response = await service.upstream.json(practice_id, "DELETE", f"/files/{file_id}")
    if response.status_code == 200:
        await service.store.mark_deleted(file_id)
    return passthrough(response)


async def file_content(request: Request) -> Response:
    """GET /v1/files/{id}/content, streamed back as it arrives."""
    service, practice_id, file_id = await _owned_file(request)
    response = await service.upstream.send(
        practice_id, "GET", f"/files/{file_id}/content", stream=True
    )
    headers = {}
    for name in ("content-type", "content-length", "content-disposition", "content-encoding"):
        if name in response.headers:
            headers[name] = response.headers[name]
    return StreamingResponse(
        response.aiter_raw(),
        status_code=response.status_code,
        headers=headers,
        background=BackgroundTask(response.aclose),
    )


# -- uploads ------------------------------------------------------------------


async def create_upload(request: Request) -> Response:
    practice_id = practice_of_scope(request)
    service = service_of(request)
    body = await small_body(request)
    response = await service.upstream.json(
        practice_id, "POST", "/uploads", content=body, headers={"content-type": "application/json"}
    )
    if response.status_code == 200:
        upload_id = json_of(response).get("id")
        if isinstance(upload_id, str):
            await service.store.record(upload_id, UPLOAD, practice_id)
    return passthrough(response)


async def _owned_upload(request: Request) -> tuple[BatchService, str, str]:
    practice_id = practice_of_scope(request)
    service = service_of(request)
    upload_id = request.path_params["upload_id"]
    if not await service.store.owns(practice_id, UPLOAD, upload_id):
        raise no_such("Upload", upload_id)
    return service, practice_id, upload_id


async def add_upload_part(request: Request) -> Response:
    service, practice_id, upload_id = await _owned_upload(request)
    return passthrough(
        await streamed_upload(
            request,
            service,
            practice_id,
            f"/uploads/{upload_id}/parts",
            limit=MAX_PART_BYTES,
        )
    )


async def complete_upload(request: Request) -> Response:
    """POST /v1/uploads/{id}/complete: the file it makes is the practice's."""
    service, practice_id, upload_id = await _owned_upload(request)
    body = await small_body(request)
    response = await service.upstream.json(
        practice_id,
        "POST",
        f"/uploads/{upload_id}/complete",
        content=body,
        headers={"content-type": "application/json"},
    )
    if response.status_code == 200:
        made = json_of(response).get("file")
        if isinstance(made, dict) and isinstance(made.get("id"), str):
            await service.store.record(made["id"], FILE, practice_id)
    return passthrough(response)


async def cancel_upload(request: Request) -> Response:
    service, practice_id, upload_id = await _owned_upload(request)
    return passthrough(
        await service.upstream.json(practice_id, "POST", f"/uploads/{upload_id}/cancel")
    )
