"""The generic follower of upstream jobs: leases, takeover, backoff, restart (both engines)."""

from __future__ import annotations

import asyncio

from gateway.followers import Again, Done, Follower, backoff_seconds
from gateway.storage import AnyDatabase
from gateway.storage.jobs import Job, JobStore


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


async def due_at(db: AnyDatabase, job_id: str) -> int:
    async with db.read() as conn:
        return int(
            await conn.fetchval(
                "SELECT next_poll_at FROM aza_upstream_jobs WHERE job_id = ?", job_id
            )
        )


async def test_two_followers_claiming_at_once_poll_a_job_once(db: AnyDatabase) -> None:
    """Of two instances claiming the same due jobs concurrently, each job goes to one."""
    jobs = JobStore(db)
    for n in range(10):
        assert await jobs.add("batch", f"b{n}", practice_id="p")
    assert not await jobs.add("batch", "b0", practice_id="p")  # queued once
    seen: list[tuple[str, str]] = []

    def handler(name: str):  # type: ignore[no-untyped-def]
        async def poll(job: Job) -> Done:
            seen.append((name, job.job_id))
            await asyncio.sleep(0)
            return Done()

        return poll

    a = Follower(JobStore(db), {"batch": handler("a")}, batch=10)
    b = Follower(JobStore(db), {"batch": handler("b")}, batch=10)
    await asyncio.gather(a.run_once(), b.run_once(), a.run_once(), b.run_once())
    assert sorted(job for _, job in seen) == sorted(f"b{n}" for n in range(10))
    assert await jobs.open_count() == 0
    assert await a.run_once() == 0  # done jobs are never polled again


async def test_a_dead_instances_lease_runs_out_and_another_takes_over(db: AnyDatabase) -> None:
    """A job claimed by an instance that died is polled by another once the lease ends."""
    clock = Clock()
    jobs = JobStore(db, clock_ms=clock)
    await jobs.add("batch", "b1", practice_id="p", payload={"n": 1})
    claimed = await jobs.claim(["batch"], owner="dead", lease_ms=5_000)
    assert [job.payload["n"] for job in claimed] == [1]
    assert await jobs.claim(["batch"], owner="alive", lease_ms=5_000) == []
    clock.ms += 5_000
    taken = await jobs.claim(["batch"], owner="alive", lease_ms=5_000)
    assert [job.job_id for job in taken] == ["b1"]
    # The dead owner's late writes change nothing.
    assert not await jobs.again(claimed[0], owner="dead", in_ms=0)
    assert not await jobs.finish(claimed[0], owner="dead")
    assert await jobs.state_of("batch", "b1") == "open"
    assert await jobs.finish(taken[0], owner="alive")
    assert await jobs.state_of("batch", "b1") == "done"


async def test_polls_back_off_up_to_the_bound_and_errors_are_retried(db: AnyDatabase) -> None:
    """Again() doubles the wait from min to max; a raising handler is polled again."""
    clock = Clock()
    jobs = JobStore(db, clock_ms=clock)
    await jobs.add("batch", "b1", practice_id="p")
    calls = 0

    async def poll(job: Job) -> Again:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("upstream said something")
        return Again()

    follower = Follower(jobs, {"batch": poll}, min_seconds=1.0, max_seconds=8.0)
    waits = []
    for _ in range(6):
        before = clock.ms
        assert await follower.run_once() == 1
        waits.append(await due_at(db, "b1") - before)
        assert await follower.run_once() == 0  # not due before its time
        clock.ms = await due_at(db, "b1")
    assert waits == [1000, 2000, 4000, 8000, 8000, 8000]
    assert calls == 6
    assert backoff_seconds(100, min_seconds=1, max_seconds=60) == 60


async def test_an_explicit_wait_is_bounded_and_a_restart_resumes(db: AnyDatabase) -> None:
    """Again(after) is capped at max_seconds; a new follower on the same database resumes."""
    clock = Clock()
    jobs = JobStore(db, clock_ms=clock)
    await jobs.add("batch", "b1", practice_id="p")

    async def wait_long(job: Job) -> Again:
        return Again(after_seconds=3600)

    first = Follower(jobs, {"batch": wait_long}, max_seconds=30.0)
    assert await first.run_once() == 1
    assert await due_at(db, "b1") == clock.ms + 30_000
    await first.aclose()
    clock.ms += 30_000
    finished: list[str] = []

    async def finish(job: Job) -> Done:
        finished.append(job.job_id)
        return Done()

    restarted = Follower(JobStore(db, clock_ms=clock), {"batch": finish})
    assert await restarted.run_once() == 1
    assert finished == ["b1"]
    assert await jobs.open_count(["batch"]) == 0


async def test_the_background_loop_polls_a_poked_job_and_only_its_kinds(db: AnyDatabase) -> None:
    """start() polls due jobs in the background; a job of another kind is left alone."""
    jobs = JobStore(db)
    await jobs.add("response", "r1", practice_id="p")
    done = asyncio.Event()

    async def poll(job: Job) -> Done:
        done.set()
        return Done()

    follower = Follower(jobs, {"batch": poll}, tick_seconds=30.0)
    follower.start()
    try:
        await jobs.add("batch", "b1", practice_id="p")
        follower.poke()
        await asyncio.wait_for(done.wait(), 5)
    finally:
        await follower.aclose()
    assert await jobs.state_of("response", "r1") == "open"
