"""Calls on one key that arrive while one is under way wait, then run as one batch.

The PostgreSQL metering store's gates and settles are single statements
that take the practice's lock in the database. Sent one by one under load,
each waits there for the one before (its round trip and, for a settle, its
WAL flush): one practice's throughput was bounded by the round trips. A
`Coalescer` keeps at most one call per key under way in this process; calls
arriving meanwhile queue, and the next round sends all of them at once (one
statement, one transaction, one flush), in the order they came.

A call alone runs at once in its caller's task: nothing is added at low
load. Each round runs `run(calls)`, which must answer one result per call,
in order; when it raises, every call of the round gets that exception.
A caller cancelled while queued is taken out of the queue; once its round
has been sent, the call may still take effect, as a statement cancelled in
flight may (the metering store's callers know: a settle is shielded, a gate
cancelled there leaves at most a hold that expires).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

A = TypeVar("A")
R = TypeVar("R")

log = logging.getLogger("aza.storage.coalesce")


class Coalescer(Generic[A, R]):
    """One call under way per key; the calls that queue meanwhile go as one batch."""

    def __init__(self, run: Callable[[Sequence[A]], Awaitable[Sequence[R]]]) -> None:
        self._run = run
        self._busy: set[str] = set()
        self._queued: dict[str, list[tuple[A, asyncio.Future[R]]]] = {}
        self._rounds: set[asyncio.Task[None]] = set()
        self.batches = 0  # rounds of more than one call (the tests read it)

    async def call(self, key: str, args: A) -> R:
        if key not in self._busy:
            self._busy.add(key)
            try:
                (result,) = await self._run([args])
            finally:
                self._next_round(key)
            return result
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        queue = self._queued.setdefault(key, [])
        entry = (args, future)
        queue.append(entry)
        try:
            return await future
        except asyncio.CancelledError:
            if entry in queue:  # its round has not been sent: take it out
                queue.remove(entry)
            raise

    def _next_round(self, key: str) -> None:
        queue = self._queued.pop(key, None)
        if not queue:
            self._busy.discard(key)
            return
        task = asyncio.get_running_loop().create_task(
            self._round(key, queue), name=f"batch of {len(queue)} on {key}"
        )
        self._rounds.add(task)
        task.add_done_callback(self._rounds.discard)

    async def _round(self, key: str, queue: list[tuple[A, asyncio.Future[R]]]) -> None:
        try:
            if len(queue) > 1:
                self.batches += 1
            results = await self._run([args for args, _ in queue])
            if len(results) != len(queue):
                raise RuntimeError(f"a batch of {len(queue)} calls answered {len(results)}")
        except asyncio.CancelledError:
            for _, future in queue:
                future.cancel()
            raise
        except BaseException as exc:
            for _, future in queue:
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # nobody left to read it is no error to log
        else:
            for (_, future), result in zip(queue, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._next_round(key)
