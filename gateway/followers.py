"""Following upstream jobs: poll each open job until it ends, shared by every instance.

A *job* is an upstream object that runs on after the request that started it:
a batch (`gateway.batches`), a background response. Whoever starts one queues
it in the database (`JobStore.add`, best inside the transaction that records
it), and every gateway instance runs one `Follower`. The follower claims due
jobs with a lease (`JobStore.claim`), hands each to the handler registered
for its kind, and does what the handler answers:

- `Done()`: the job is finished (the handler has charged and released what
  it must); it is never polled again.
- `Again(after_seconds)`: poll it again later, after `after_seconds` or, when
  None, after the follower's own backoff, which doubles with every poll from
  `min_seconds` up to `max_seconds` (so a job that runs for hours costs a
  poll a minute, not one a second).
- an exception: logged (its class only: messages may hold upstream text)
  and retried with the same bounded backoff.

Because the queue is in the database, a restart loses nothing: jobs stay
open until some instance's handler says Done, and a lease whose instance
died runs out after `lease_seconds`, when another instance takes the job
over. Handlers must therefore be idempotent (a poll may be repeated after a
crash): the batch handler is, since every usage event is unique on its
derived request id.

Usage::

    follower = Follower(JobStore(db), {"batch": poll_batch}, owner="gw-1")
    follower.start()          # in the lifespan
    follower.poke()           # a job was queued here: look now, not at the next tick
    await follower.aclose()   # at shutdown; leases left run out by themselves
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from gateway.storage.jobs import Job, JobStore

log = logging.getLogger("aza.gateway.followers")


@dataclass(frozen=True, slots=True)
class Done:
    """The job ended; stop following it."""


@dataclass(frozen=True, slots=True)
class Again:
    """Poll the job again after `after_seconds` (None: the follower's backoff)."""

    after_seconds: float | None = None


PollResult = Done | Again
JobHandler = Callable[[Job], Awaitable[PollResult]]


def backoff_seconds(attempts: int, *, min_seconds: float, max_seconds: float) -> float:
    """`min_seconds` doubled `attempts` times, at most `max_seconds`."""
    return float(min(max_seconds, min_seconds * (2 ** min(attempts, 30))))


class Follower:
    """Polls the open jobs of the registered kinds, a lease at a time (see the module doc)."""

    def __init__(
        self,
        jobs: JobStore,
        handlers: Mapping[str, JobHandler],
        *,
        owner: str | None = None,
        min_seconds: float = 1.0,
        max_seconds: float = 60.0,
        lease_seconds: float = 120.0,
        tick_seconds: float | None = None,
        batch: int = 16,
    ) -> None:
        self.jobs = jobs
        self.handlers = dict(handlers)
        # Unique per process: a lease names the instance that holds it.
        self.owner = owner or "follower-" + secrets.token_hex(8)
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self.lease_seconds = lease_seconds
        # How often the database is asked for due jobs when nothing pokes.
        self.tick_seconds = tick_seconds if tick_seconds is not None else min_seconds
        self.batch = batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.polls = 0  # handler calls made here; the tests read it

    def start(self) -> None:
        """Run the follower in a background task of the running loop."""
        if self._task is None and self.handlers:
            self._task = asyncio.create_task(self._run(), name=f"follower:{self.owner}")

    def poke(self) -> None:
        """Look for due jobs now (a job was just queued or woken here)."""
        self._wake.set()

    async def aclose(self) -> None:
        """Stop polling. A poll under way is cancelled and its lease given up, so that
        another instance (or this one restarted) takes the job over at once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            try:
                await self.jobs.release_all(owner=self.owner)
            except Exception as exc:
                log.warning("giving up job leases failed (%s); they run out", type(exc).__name__)

    async def _run(self) -> None:
        while True:
            try:
                handled = await self.run_once()
            except Exception as exc:
                log.error("claiming upstream jobs failed: %s", exc.__class__.__name__)
                handled = 0
            if handled >= self.batch:
                continue  # more may be due at once
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick_seconds):
                    await self._wake.wait()
            self._wake.clear()

    async def run_once(self) -> int:
        """Claim the due jobs (up to `batch`) and poll each once. Returns how many."""
        claimed = await self.jobs.claim(
            list(self.handlers),
            owner=self.owner,
            lease_ms=int(self.lease_seconds * 1000),
            limit=self.batch,
        )
        if claimed:
            await asyncio.gather(*(self._poll(job) for job in claimed))
        return len(claimed)

    async def _poll(self, job: Job) -> None:
        handler = self.handlers[job.kind]
        self.polls += 1
        error: str | None = None
        try:
            result = await handler(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc.__class__.__name__
            log.warning("polling %s %s failed (%s); retrying later", job.kind, job.job_id, error)
            result = Again()
        try:
            if isinstance(result, Done):
                await self.jobs.finish(job, owner=self.owner)
                return
            after = result.after_seconds
            if after is None:
                after = backoff_seconds(
                    job.attempts, min_seconds=self.min_seconds, max_seconds=self.max_seconds
                )
            after = min(max(after, 0.0), self.max_seconds)
            await self.jobs.again(job, owner=self.owner, in_ms=int(after * 1000), error=error)
        except Exception as exc:
            # The lease runs out and the job is polled again: nothing is lost.
            log.error("rescheduling %s %s failed: %s", job.kind, job.job_id, type(exc).__name__)
