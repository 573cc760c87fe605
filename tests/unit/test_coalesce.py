"""The coalescer: one call under way per key, the calls that queue meanwhile as one batch."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.storage.coalesce import Coalescer


class Recorder:
    """A `run` that records its rounds and waits for a gate before answering."""

    def __init__(self) -> None:
        self.rounds: list[list[int]] = []
        self.gate = asyncio.Event()
        self.fail: BaseException | None = None

    async def __call__(self, calls: Sequence[int]) -> list[int]:
        self.rounds.append(list(calls))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [call * 10 for call in calls]


async def test_a_lone_call_runs_at_once_and_alone() -> None:
    run = Recorder()
    run.gate.set()
    coalescer = Coalescer(run)
    assert await coalescer.call("k", 1) == 10
    assert await coalescer.call("k", 2) == 20
    assert run.rounds == [[1], [2]] and coalescer.batches == 0


async def test_calls_that_queue_meanwhile_go_as_one_batch_in_order() -> None:
    run = Recorder()
    coalescer = Coalescer(run)
    first = asyncio.create_task(coalescer.call("k", 1))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(coalescer.call("k", i)) for i in (2, 3, 4)]
    other_key = asyncio.create_task(coalescer.call("other", 9))
    await asyncio.sleep(0)
    assert run.rounds == [[1], [9]]  # another key is not held up
    run.gate.set()
    assert await first == 10
    assert [await task for task in rest] == [20, 30, 40]
    assert await other_key == 90
    assert run.rounds == [[1], [9], [2, 3, 4]] and coalescer.batches == 1


async def test_a_failing_round_fails_every_call_in_it_and_the_next_round_runs() -> None:
    run = Recorder()
    coalescer = Coalescer(run)
    first = asyncio.create_task(coalescer.call("k", 1))
    await asyncio.sleep(0)
    batch = [asyncio.create_task(coalescer.call("k", i)) for i in (2, 3)]
    await asyncio.sleep(0)
    run.fail = OSError("down")
    run.gate.set()
    for task in (first, *batch):
        with pytest.raises(OSError):
            await task
    run.fail = None
    assert await coalescer.call("k", 5) == 50


async def test_a_caller_cancelled_in_the_queue_is_not_sent() -> None:
    run = Recorder()
    coalescer = Coalescer(run)
    first = asyncio.create_task(coalescer.call("k", 1))
    await asyncio.sleep(0)
    leaving = asyncio.create_task(coalescer.call("k", 2))
    staying = asyncio.create_task(coalescer.call("k", 3))
    await asyncio.sleep(0)
    leaving.cancel()
    run.gate.set()
    assert await first == 10 and await staying == 30
    assert leaving.cancelled()
    assert run.rounds == [[1], [3]]


async def test_a_round_answering_the_wrong_number_of_results_fails_its_calls() -> None:
    gate = asyncio.Event()

    async def short(calls: Sequence[int]) -> list[int]:
        await gate.wait()
        return [0]

    coalescer: Coalescer[int, int] = Coalescer(short)
    first = asyncio.create_task(coalescer.call("k", 1))
    await asyncio.sleep(0)
    batch = [asyncio.create_task(coalescer.call("k", i)) for i in (2, 3)]
    await asyncio.sleep(0)  # both queued behind the first
    gate.set()
    assert await first == 0
    for task in batch:
        with pytest.raises(RuntimeError):
            await task
