"""The Batch API through the gateway: gated up front at the batch price, charged per line.

`POST /v1/batches` reads the input file (the upstream's content of a file
the practice owns, streamed line by line), checks every line
(`budget.batch.BatchEstimator`: JSON, POST to the batch's endpoint, one
priced model, a body the gateway can meter) and holds the whole estimate at
the model's batch price through the gate every request passes (403/429 in
the usual shape when the practice cannot afford it; nothing reaches the
upstream). A line it cannot meter makes the whole batch a 400 naming the
line; nothing is held then.

The estimate is held on the creating key's and device's monthly caps too
(the cap's 429 when one is full). Before the upstream is asked, the batch
is recorded under an intent id, with its holds and a job, in one
transaction; the intent id goes to the upstream as `metadata.aza_intent`.
The upstream's answer names the batch (its ownership and a job to follow
it, in one transaction); a refusal (4xx) releases the holds at once. When
no answer came (the gateway died, the upstream was slow or failed), the
intent's job, after a grace longer than any create call, looks for the
batch among the upstream's by its metadata: found, it is followed; none,
the holds are released (`resolve_intent`). The follower
(`gateway.followers`) polls each batch, on whichever instance claims it,
keeping its holds alive while it runs. When it ends (completed, failed, expired,
cancelled) `poll_batch` reads its output and error files and settles it:
one usage event per completed line at the batch price (request id
`batch:<batch_id>:<custom_id>`), the hold released (`BatchStore.settle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router

from budget.batch import (
    BATCH_ENDPOINTS,
    BATCH_TIER,
    MAX_BATCH_FILE_BYTES,
    BatchEstimator,
    InvalidBatchLine,
    output_line_usage,
)
from budget.limits import Scope
from budget.pricing import UnpricedModel
from budget.usage import Usage
from gateway import files
from gateway.auth import Caller
from gateway.errors import GatewayError, bad_request, unavailable
from gateway.files import (
    FilesUpstream,
    _Passthrough,
    _TooLarge,
    file_too_large,
    json_of,
    lines_of,
    no_such,
    owned_listing,
    passthrough,
    practice_of_scope,
    service_of,
    small_body,
)
from gateway.followers import Again, Done, Follower, PollResult
from gateway.handover import caller_of
from gateway.limiting import cap_reached, device_subject, hold_caps, release_limits, subjects_of
from gateway.proxy import upstream_timeout
from gateway.routes.common import endpoint
from gateway.storage.batches import (
    BATCH,
    CREATING,
    FILE,
    BatchRow,
    BatchStore,
    ChargedLine,
)
from gateway.storage.holds import Hold
from gateway.storage.jobs import Job, JobStore
from gateway.storage.limits import CapHold, LimitStore

if TYPE_CHECKING:
    from gateway.services import Services

log = logging.getLogger("aza.gateway.batches")

JOB_KIND = "batch"
# A batch recorded before the upstream was asked to make it (see `create_batch`).
INTENT_KIND = "batch-intent"
# The metadata entry that carries a batch's intent id to the upstream and back.
INTENT_KEY = "aza_intent"
# OpenAI takes at most 16 metadata pairs; the gateway's own is one of them.
MAX_METADATA_PAIRS = 16
# The upstream's batch list is searched back to this long before an intent was made.
_LIST_SKEW_SECONDS = 600
_LIST_MAX_PAGES = 100
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# A batch's hold outlives OpenAI's 24 h completion window by this much at
# first; the follower keeps it alive for as long as the batch runs.
_WINDOW_SECONDS = 24 * 3600
_MARGIN_SECONDS = 3600


class BatchService:
    """What the Files and Batch routes share: the store, the job queue, the upstream clients
    and the follower (made in the lifespan, closed with `aclose`)."""

    def __init__(self, services: Services) -> None:
        settings = services.settings
        self.services = services
        self.store = BatchStore(
            services.db, states=services.metering.states, marks=services.alerts.ensure_marks_in
        )
        self.jobs = JobStore(services.db)
        self.upstream = FilesUpstream(services)
        # The upstream's answer to a batch create is awaited this long at most; an intent
        # is looked for upstream only after twice that (and a poll) has passed.
        self.create_timeout_seconds = min(settings.upstream_timeout_seconds, 60.0)
        self.intent_grace_ms = int(
            (2 * self.create_timeout_seconds + settings.job_poll_max_seconds) * 1000
        )
        self.follower = Follower(
            self.jobs,
            {JOB_KIND: self.poll_batch, INTENT_KIND: self.resolve_intent},
            min_seconds=settings.job_poll_min_seconds,
            max_seconds=settings.job_poll_max_seconds,
        )

    def start(self) -> None:
        self.follower.start()

    async def aclose(self) -> None:
        await self.follower.aclose()
        await self.upstream.aclose()

    def _cost(self, practice_id: str) -> Callable[[Usage], int]:
        """Prices a usage at the batch price under the HTTP path's model rules (micro-USD)."""
        pricing = self.services.pricing
        uplift = self.upstream.upstream_for(practice_id).uplift

        def cost(usage: Usage) -> int:
            pricing.check(usage.model, BATCH_TIER)
            return pricing.cost_micros(replace(usage, service_tier=BATCH_TIER), uplift)

        return cost

    async def own_result_files(self, practice_id: str, data: dict[str, Any]) -> None:
        """A batch's output and error files belong to the practice that owns the batch."""
        for key in ("output_file_id", "error_file_id"):
            file_id = data.get(key)
            if isinstance(file_id, str) and file_id:
                await self.store.record(file_id, FILE, practice_id)

    def hold_until(self) -> int:
        """How long a running batch's hold is kept from now: past the next poll, always."""
        settings = self.services.settings
        keep = settings.hold_ttl_seconds + 2 * settings.job_poll_max_seconds
        return int(time.time() + keep)

    # -- intents --------------------------------------------------------------

    async def name(self, row: BatchRow, batch_id: str, status: str) -> bool:
        """The upstream made the batch of intent `row` as `batch_id`: record its owner and
        follow it, in one transaction. False when the intent was given up meanwhile."""
        assert row.intent_id is not None
        async with self.services.db.transaction(lock=row.practice_id) as conn:
            named = await self.store.name_intent(conn, row.intent_id, batch_id, status)
            if named is None:
                return False
            if named:
                await self.store.record(batch_id, BATCH, row.practice_id, conn=conn)
                await self.jobs.add(
                    JOB_KIND,
                    batch_id,
                    practice_id=row.practice_id,
                    conn=conn,
                    first_poll_in_ms=int(self.follower.min_seconds * 1000),
                )
                await self.jobs.close(conn, INTENT_KIND, row.intent_id)
        self.follower.poke()
        return True

    async def abandon(self, row: BatchRow) -> bool:
        """No batch was made for intent `row`: its holds go, in one transaction."""
        assert row.intent_id is not None
        async with self.services.db.transaction(lock=row.practice_id) as conn:
            abandoned = await self.store.abandon_intent(conn, row.intent_id)
            await self.jobs.close(conn, INTENT_KIND, row.intent_id)
        return abandoned

    async def resolve_intent(self, job: Job) -> PollResult:
        """An intent still unnamed after its grace (the gateway stopped, or the client left,
        between asking the upstream and recording its answer): the upstream's batch that
        carries its id in `metadata` is followed from now on; when there is none, the
        intent's holds are released."""
        row = await self.store.intent(job.job_id)
        if row is None or row.status != CREATING or row.batch_id != row.intent_id:
            return Done()
        found = await self._find_upstream(row)
        if found is None:
            if await self.abandon(row):
                log.info("batch intent %s: no batch upstream; holds released", row.intent_id)
            return Done()
        if await self.name(row, str(found["id"]), str(found.get("status") or "validating")):
            log.info("batch intent %s: found upstream as %s", row.intent_id, found["id"])
        return Done()

    async def _find_upstream(self, row: BatchRow) -> dict[str, Any] | None:
        """The upstream batch whose metadata names `row`'s intent, from the newest back to
        a little before the intent was made; None when there is none."""
        params: dict[str, Any] = {"limit": 100}
        oldest = row.created_at - _LIST_SKEW_SECONDS
        for _ in range(_LIST_MAX_PAGES):
            response = await self.upstream.json(row.practice_id, "GET", "/batches", params=params)
            if response.status_code != 200:
                raise RuntimeError(f"batch list answered {response.status_code}")
            page = json_of(response)
            items = [item for item in page.get("data") or () if isinstance(item, dict)]
            for item in items:
                metadata = item.get("metadata")
                if isinstance(metadata, dict) and metadata.get(INTENT_KEY) == row.intent_id:
                    return item
            older = [item.get("created_at") for item in items]
            if (
                not items
                or not page.get("has_more")
                or any(isinstance(at, int) and at < oldest for at in older)
            ):
                return None
            params = {"limit": 100, "after": items[-1].get("id")}
        return None

    # -- following ----------------------------------------------------------

    async def poll_batch(self, job: Job) -> PollResult:
        """One poll of a followed batch: settle it when it ended, else keep its hold alive."""
        batch = await self.store.batch(job.job_id)
        if batch is None or batch.settled_at is not None:
            return Done()
        response = await self.upstream.json(batch.practice_id, "GET", f"/batches/{batch.batch_id}")
        if response.status_code == 404:
            # The upstream forgot it (deleted with its project): nothing ran to charge.
            log.warning("batch %s is unknown upstream; releasing its hold", batch.batch_id)
            await self.store.settle(batch, status="missing", charged=[], failed_lines=0)
            return Done()
        if response.status_code != 200:
            raise RuntimeError(f"batch retrieve answered {response.status_code}")
        data = json_of(response)
        await self.own_result_files(batch.practice_id, data)
        status = str(data.get("status"))
        if status not in TERMINAL:
            await self.store.follow_status(batch.batch_id, status, hold_until=self.hold_until())
            return Again()
        charged, failed = await self._charged_lines(batch, data)
        await self.store.settle(batch, status=status, charged=charged, failed_lines=failed)
        log.info("batch %s %s: %d lines charged", batch.batch_id, status, len(charged))
        return Done()

    async def _charged_lines(
        self, batch: BatchRow, data: dict[str, Any]
    ) -> tuple[list[ChargedLine], int]:
        """The completed lines of an ended batch with their cost, and how many failed."""
        operation = BATCH_ENDPOINTS[batch.endpoint]
        cost = self._cost(batch.practice_id)
        per_line = math.ceil(batch.estimate_micros / max(1, batch.lines))
        charged: dict[str, ChargedLine] = {}
        failed = 0
        for key in ("output_file_id", "error_file_id"):
            file_id = data.get(key)
            if not isinstance(file_id, str) or not file_id:
                continue
            response = await self.upstream.send(
                batch.practice_id, "GET", f"/files/{file_id}/content", stream=True
            )
            try:
                if response.status_code != 200:
                    raise RuntimeError(f"batch output file answered {response.status_code}")
                async for raw in lines_of(response):
                    line = output_line_usage(raw, operation=operation, model=batch.model)
                    if line is None or line.custom_id in charged:
                        continue
                    if not line.completed:
                        failed += 1
                        continue
                    usage = line.usage
                    micros: int | None = None
                    if usage is not None:
                        with contextlib.suppress(UnpricedModel, GatewayError):
                            micros = cost(usage)
                    if usage is None or micros is None:
                        # Completed without readable usage: charged its share of the estimate.
                        usage = Usage(
                            operation, batch.model, estimated=True, service_tier=BATCH_TIER
                        )
                        micros = per_line
                    charged[line.custom_id] = ChargedLine(line.custom_id, usage, micros)
            finally:
                await response.aclose()
        return list(charged.values()), failed


# -- routes -------------------------------------------------------------------


async def _estimate(
    service: BatchService, practice_id: str, file_id: str, batch_endpoint: str
) -> tuple[int, str, int]:
    """Lines, model and estimate (micro-USD) of an input file; 400 for one it cannot meter."""
    settings = service.services.settings
    estimator = BatchEstimator(
        batch_endpoint,
        cost_micros=service._cost(practice_id),
        default_max_output_tokens=settings.default_max_output_tokens,
    )
    response = await service.upstream.send(
        practice_id, "GET", f"/files/{file_id}/content", stream=True
    )
    try:
        if response.status_code != 200:
            await response.aread()
            raise _Passthrough(response)
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BATCH_FILE_BYTES:
            raise file_too_large(MAX_BATCH_FILE_BYTES, "batch input file")
        try:
            async for raw in lines_of(response, limit=MAX_BATCH_FILE_BYTES):
                estimator.feed(raw)
        except _TooLarge:
            raise file_too_large(MAX_BATCH_FILE_BYTES, "batch input file") from None
        result = estimator.result()
    except InvalidBatchLine as exc:
        raise bad_request(exc.message, code=exc.code, param="input_file_id") from None
    finally:
        await response.aclose()
    return result.lines, result.model, result.estimate_micros


async def create_batch(request: Request) -> Response:
    """POST /v1/batches: checked and held at the batch price before the upstream sees it."""
    from gateway.admission import gate

    practice_id = practice_of_scope(request)
    service = service_of(request)
    services = service.services
    raw = await small_body(request)
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise bad_request("Invalid JSON body", code="invalid_json")
    batch_endpoint = body.get("endpoint")
    if not isinstance(batch_endpoint, str) or batch_endpoint not in BATCH_ENDPOINTS:
        raise bad_request(f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}", param="endpoint")
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not await service.store.owns(practice_id, FILE, file_id):
        raise no_such("File", str(file_id), param="input_file_id", status=400)
    forward, intent_id = _with_intent(body)
    try:
        lines, model, estimate = await _estimate(service, practice_id, file_id, batch_endpoint)
    except _Passthrough as exc:
        return passthrough(exc.response)
    caller = caller_of(request.scope)
    request_id = str(request.scope["state"].get("request_id"))
    expires_at = int(time.time()) + _WINDOW_SECONDS + _MARGIN_SECONDS

    async def reserve() -> Any:
        # A request's life at first (a crash before the intent is written leaves a
        # hold that runs out like a request's); the batch's once the intent is written.
        return await services.metering.reserve_own(
            practice_id,
            request_id=f"batch-hold:{request_id}",
            estimate_micros=estimate,
            expires_at=int(time.time()) + services.settings.hold_ttl_seconds,
        )

    hold = await gate(services, practice_id, reserve)
    caps: Sequence[CapHold] = ()
    try:
        caps = await _hold_caps(services, caller, practice_id, hold, estimate)
        row = BatchRow(
            batch_id=intent_id,
            practice_id=practice_id,
            hold_id=hold.hold_id,
            endpoint=batch_endpoint,
            model=model,
            input_file_id=file_id,
            lines=lines,
            estimate_micros=estimate,
            status=CREATING,
            completed_lines=0,
            failed_lines=0,
            cost_micros=0,
            created_at=int(time.time()),
            settled_at=None,
            device_id=caller.device_id,
            intent_id=intent_id,
            cap_hold_id=intent_id if caps else None,
            cap_key=next((c.subject.name for c in caps if c.subject.scope is Scope.KEY), None),
            cap_device=next(
                (c.subject.name for c in caps if c.subject.scope is Scope.DEVICE), None
            ),
        )
        # The intent first, with its holds: whatever happens from here on, a follower
        # either finds the batch upstream by its metadata or releases the holds.
        async with services.db.transaction(lock=practice_id) as conn:
            await service.store.insert_batch(conn, row)
            await service.store.keep_hold(conn, practice_id, hold.hold_id, expires_at)
            await service.jobs.add(
                INTENT_KIND,
                intent_id,
                practice_id=practice_id,
                conn=conn,
                first_poll_in_ms=service.intent_grace_ms,
            )
            if caps:
                await LimitStore.hold_durable(conn, caps, intent_id, expires_at)
    except BaseException:
        # Not recorded (a cap, the database, the client gone): nothing may stay held.
        await _shielded(services, _release(services, hold, caps), "release batch holds")
        raise
    if caps:
        # Held durably under the intent now; the request's own cap holds go back.
        services.spawn(release_limits(services.limit_leases, caps), name="release cap holds")
    try:
        async with asyncio.timeout(service.create_timeout_seconds):
            response = await service.upstream.json(
                practice_id,
                "POST",
                "/batches",
                content=forward,
                headers={"content-type": "application/json"},
            )
    except TimeoutError:
        # Whether the upstream made it is not known: the intent's follower finds out.
        raise upstream_timeout() from None
    data = json_of(response)
    batch_id = data.get("id")
    if response.status_code != 200 or not isinstance(batch_id, str):
        if 400 <= response.status_code < 500:
            # The upstream refused it: nothing was made, nothing stays held.
            await _shielded(services, service.abandon(row), "abandon batch intent")
        # Else (a 5xx) it may have been made all the same: the intent's follower finds out.
        return passthrough(response)
    try:
        named = await service.name(row, batch_id, str(data.get("status") or "validating"))
    except Exception:
        log.exception("recording batch %s failed; its intent's follower will find it", batch_id)
        raise unavailable() from None
    if not named:
        # Given up before the upstream answered (past the create timeout): it must not run.
        log.warning("batch %s answered after its intent was given up; cancelling it", batch_id)
        with contextlib.suppress(Exception):
            await service.upstream.json(practice_id, "POST", f"/batches/{batch_id}/cancel")
        raise unavailable()
    return passthrough(response)


def _with_intent(body: dict[str, Any]) -> tuple[bytes, str]:
    """The batch create body to forward, with a new intent id in its metadata; 400 for
    metadata that is not string pairs or leaves no room for the gateway's."""
    metadata = body.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise bad_request("metadata must be an object of string values", param="metadata")
    own = {key: value for key, value in metadata.items() if key != INTENT_KEY}
    if len(own) >= MAX_METADATA_PAIRS:
        raise bad_request(
            f"metadata may hold at most {MAX_METADATA_PAIRS - 1} pairs through the gateway: "
            f"it adds '{INTENT_KEY}', by which it finds the batch again after a failure",
            param="metadata",
        )
    intent_id = "batch_intent_" + secrets.token_hex(16)
    forward = {**body, "metadata": {**own, INTENT_KEY: intent_id}}
    return json.dumps(forward, separators=(",", ":")).encode(), intent_id


async def _hold_caps(
    services: Services, caller: Caller, practice_id: str, hold: Hold, estimate_micros: int
) -> Sequence[CapHold]:
    """The batch's estimate held on the monthly caps of the creating key and device, as a
    request's is; the cap's 429 when one is full (the caller releases the budget's hold)."""
    key = caller.key
    if key is None or (key.limits is None and not key.device_limits):
        return ()
    device = await device_subject(services.limits, caller, practice_id)
    caps, full = await hold_caps(
        services.limit_leases, subjects_of(caller, device), hold, estimate_micros
    )
    if full is not None:
        services.metrics.gate_decisions.labels("cap_reached").inc()
        raise cap_reached(full, await services.alerts.language(practice_id))
    return caps


async def _release(services: Services, hold: Hold, caps: Sequence[CapHold]) -> None:
    try:
        if caps:
            await release_limits(services.limit_leases, caps)
    finally:
        await services.metering.release(hold)


async def _shielded(services: Services, work: Coroutine[Any, Any, Any], name: str) -> None:
    """Run `work` to its end even when the request is cancelled meanwhile."""
    await asyncio.shield(services.spawn(work, name=name))


async def list_batches(request: Request) -> Response:
    practice_id = practice_of_scope(request)
    try:
        page = await owned_listing(request, "/batches", BATCH, practice_id)
    except _Passthrough as exc:
        return passthrough(exc.response)
    return Response(json.dumps(page), media_type="application/json")


async def _owned_batch(request: Request) -> tuple[BatchService, str, str]:
    practice_id = practice_of_scope(request)
    service = service_of(request)
    batch_id = request.path_params["batch_id"]
    if not await service.store.owns(practice_id, BATCH, batch_id):
        raise no_such("Batch", batch_id)
    return service, practice_id, batch_id


async def retrieve_batch(request: Request) -> Response:
    service, practice_id, batch_id = await _owned_batch(request)
    response = await service.upstream.json(practice_id, "GET", f"/batches/{batch_id}")
    if response.status_code == 200:
        await service.own_result_files(practice_id, json_of(response))
    return passthrough(response)


async def cancel_batch(request: Request) -> Response:
    """POST /v1/batches/{id}/cancel; the follower looks at it at once."""
    service, practice_id, batch_id = await _owned_batch(request)
    response = await service.upstream.json(practice_id, "POST", f"/batches/{batch_id}/cancel")
    if response.status_code == 200:
        await service.jobs.wake(JOB_KIND, batch_id)
        service.follower.poke()
    return passthrough(response)


def _routes() -> list[Route]:
    table: list[tuple[str, Callable[[Request], Awaitable[Response]], str]] = [
        ("/v1/files", files.create_file, "POST"),
        ("/v1/files", files.list_files, "GET"),
        ("/v1/files/{file_id}", files.retrieve_file, "GET"),
        ("/v1/files/{file_id}", files.delete_file, "DELETE"),
        ("/v1/files/{file_id}/content", files.file_content, "GET"),
        ("/v1/uploads", files.create_upload, "POST"),
        ("/v1/uploads/{upload_id}/parts", files.add_upload_part, "POST"),
        ("/v1/uploads/{upload_id}/complete", files.complete_upload, "POST"),
        ("/v1/uploads/{upload_id}/cancel", files.cancel_upload, "POST"),
        ("/v1/batches", create_batch, "POST"),
        ("/v1/batches", list_batches, "GET"),
        ("/v1/batches/{batch_id}", retrieve_batch, "GET"),
        ("/v1/batches/{batch_id}/cancel", cancel_batch, "POST"),
    ]
    return [Route(path, endpoint(handler), methods=[method]) for path, handler, method in table]


def files_and_batches_app() -> Router:
    """The ASGI app the metering middleware hands the Files and Batch endpoints to."""
    return Router(routes=_routes())
