"""Background responses (`background: true`): held while they run, settled once at real usage.

OpenAI answers a background request at once (`status` queued or in
progress, no usage) and runs it on. The gateway then swaps the request's
hold for a durable one of the same amount (`bg:<response id>` in
`ai_budget_holds`, kept until the response ends) and records a job in
`ai_responses`. The job is settled, exactly once, by whichever comes first:

- the client polls `GET /v1/responses/{id}` (or cancels) through the
  gateway and the answer is finished: its usage is charged;
- the gateway's own polls: a job of kind `background_response` in the
  generic follower's queue (`gateway.followers`, shared with batches),
  queued in the transaction that records the response; whichever instance
  claims it polls the upstream that made the response, with the follower's
  bounded backoff, and a restart resumes it.

A response that is gone upstream (404), or still unfinished after
`MAX_FOLLOW_SECONDS`, is charged its hold (recorded as estimated): never free.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from budget.operations import Operation
from budget.request import RequestInfo
from budget.response import exact_json, usage_of_object
from budget.usage import Usage
from credit.ports import Connection
from gateway.followers import Again, Done, Follower, PollResult
from gateway.routing import Upstream
from gateway.services import Services
from gateway.storage.jobs import Job, JobStore
from gateway.storage.limits import CapHold, LimitStore
from gateway.storage.responses import ResponseStore, StoredResponse, background_hold_id
from gateway.storage.settle import write_usage

log = logging.getLogger("aza.gateway.background")

# Statuses of a response that is still running, and of one that has ended.
RUNNING = frozenset({"queued", "in_progress"})
FINISHED = frozenset({"completed", "failed", "cancelled", "incomplete"})
# How long the gateway follows a background response before charging its hold.
MAX_FOLLOW_SECONDS = 24 * 3600
# Polls back off from the base interval to this, doubling.
MAX_POLL_GAP_SECONDS = 300
JOB_KIND = "background_response"


def response_status(data: dict[str, Any] | None) -> str | None:
    status = data.get("status") if data is not None else None
    return status if isinstance(status, str) else None


class BackgroundResponses:
    """Starts, settles and follows the background responses of one gateway."""

    def __init__(
        self,
        services: Services,
        *,
        price: Callable[[Usage, Decimal], int],
        poll_seconds: float = 5.0,
    ) -> None:
        self.services = services
        self.price = price  # usage and upstream uplift -> micro-USD (the middleware's Pricing)
        self.store = ResponseStore(services.db)
        self.jobs = JobStore(services.db)
        self.poll_seconds = poll_seconds
        self.follower = Follower(
            self.jobs,
            {JOB_KIND: self.poll},
            min_seconds=poll_seconds,
            max_seconds=max(poll_seconds, MAX_POLL_GAP_SECONDS),
        )

    def start(self) -> None:
        """Follow the background responses of every instance (in the lifespan)."""
        self.follower.start()

    async def aclose(self) -> None:
        await self.follower.aclose()

    async def register(
        self,
        *,
        response_id: str,
        practice_id: str,
        request_id: str,
        info: RequestInfo,
        model: str,
        upstream: str | None,
        hold_micros: int,
        pending: bool,
        caps: Sequence[CapHold] = (),
    ) -> bool:
        """Record a stored response; a pending (background) one becomes a job with its hold,
        and its key's and device's cap holds (`caps`) durable ones beside it."""
        hold_seconds = MAX_FOLLOW_SECONDS + 3600

        async def queue(conn: Connection) -> None:
            await self.jobs.add(
                JOB_KIND,
                response_id,
                practice_id=practice_id,
                first_poll_in_ms=int(self.poll_seconds * 1000),
                conn=conn,
            )
            if caps:
                await LimitStore.hold_durable(
                    conn, caps, background_hold_id(response_id), int(time.time()) + hold_seconds
                )

        added = await self.store.register(
            StoredResponse(
                response_id=response_id,
                practice_id=practice_id,
                request_id=request_id,
                model=model,
                upstream=upstream,
                service_tier=info.service_tier,
                web_search_preview=info.web_search_preview,
                hold_micros=hold_micros if pending else 0,
                created_at=int(time.time()),
                pending=pending,
            ),
            hold_seconds=hold_seconds,
            queue=queue,
        )
        return added

    async def settle(self, job: StoredResponse, data: dict[str, Any] | None) -> bool:
        """Charge a finished (or abandoned) background response once; False if settled before.

        `data`: the finished response object; None charges the hold (estimated).
        """
        services = self.services
        usage: Usage | None = None
        if data is not None:
            info = RequestInfo(
                Operation.RESPONSES,
                job.model,
                service_tier=job.service_tier,
                web_search_preview=job.web_search_preview,
            )
            model = data.get("model")
            usage = usage_of_object(info, model if isinstance(model, str) else job.model, data)
        upstream = self.upstream(job.upstream)
        uplift = upstream.uplift if upstream is not None else Decimal(0)
        if usage is not None:
            try:
                cost = self.price(usage, uplift)
            except Exception:
                log.exception("pricing background response %s failed", job.response_id)
                usage, cost = None, job.hold_micros
        if usage is None:
            usage = Usage(Operation.RESPONSES, job.model, estimated=True)
            cost = job.hold_micros
        state = await services.metering.state(job.practice_id)
        lic, period = state.license, state.period
        async with services.db.transaction(lock=job.practice_id) as conn:
            if not await self.store.finish(conn, job):
                return False
            if lic is not None and period is not None:
                budget = services.settings.plans.monthly_budget_micros(lic.lookup_key) or 0
                # It may end in a period no gate has seen yet: the marks first, here.
                await services.alerts.ensure_marks_in(conn, job.practice_id, period.start, budget)
                await LimitStore.settle_durable(
                    conn, job.practice_id, background_hold_id(job.response_id), cost, period.start
                )
                await write_usage(
                    conn,
                    lic=lic,
                    period=period,
                    budget_micros=budget,
                    usage=usage,
                    cost_micros=cost,
                    request_id=job.request_id,
                    device_id=None,
                    status="success" if response_status(data) == "completed" else "partial",
                    started_at=job.created_at,
                    now=int(time.time()),
                    hold_micros=job.hold_micros,
                )
            else:
                log.warning("background response %s: practice has no license", job.response_id)
                await LimitStore.settle_durable(
                    conn, job.practice_id, background_hold_id(job.response_id), 0, 0
                )
        services.metrics.usage_cost.inc(cost)
        return True

    def upstream(self, name: str | None) -> Upstream | None:
        """The upstream named `name` (the one that made the response), else the first."""
        upstreams = self.services.router.upstreams
        for upstream in upstreams:
            if upstream.name == name:
                return upstream
        return upstreams[0] if upstreams else None

    async def poll(self, job: Job) -> PollResult:
        """The follower's handler: poll one background response, settle it when it ended."""
        stored = await self.store.get(job.job_id)
        if stored is None or not stored.pending:
            return Done()  # settled meanwhile (the client's poll)
        upstream = self.upstream(stored.upstream)
        if upstream is None:
            return Again()
        headers = [(b"accept-encoding", b"identity")]
        if upstream.auth is not None:
            headers.append(upstream.auth)
        response = await upstream.client.send(
            "GET",
            upstream.target(f"/responses/{stored.response_id}", "", stored.model),
            headers=headers,
            content=b"",
        )
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        if response.status_code == 404:
            await self.settle(stored, None)  # gone: the hold is charged
            return Done()
        data = exact_json(body) if response.status_code == 200 else None
        if response_status(data) in FINISHED:
            await self.settle(stored, data)
            return Done()
        if time.time() - stored.created_at > MAX_FOLLOW_SECONDS:
            log.warning("background response %s unfinished after 24 h", stored.response_id)
            await self.settle(stored, None)
            return Done()
        return Again()
