"""The SQLite engine itself: group commit of queued transactions, background checkpoints.

Transaction blocks here await `asyncio.sleep(0)` or an event on purpose: a
block that awaits only its statements never yields to the loop, so nothing
would queue behind it and no group would form.

Commits are observed through SQLite itself where it matters: a trace of the
statements the writer connection really ran, and fresh `sqlite3`
connections to the file (they see committed data only).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest

from credit.ports import DatabaseUnavailable, UniqueViolation
from gateway.storage.sqlite import (
    CHECKPOINT_COMMITS,
    DEFER_LONELY_LIMIT,
    DEFER_PROBE_EVERY,
    GROUP_LIMIT,
    SqliteDatabase,
)


class Boom(Exception):
    pass


def committed_ids(path: Path) -> list[int]:
    """The ids of table t as a fresh connection sees them: committed rows only."""
    with closing(sqlite3.connect(path)) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM t ORDER BY id")]


def trace(conn: sqlite3.Connection | None) -> list[str]:
    """Every statement `conn` runs from now on, as SQLite reports it."""
    assert conn is not None
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    return statements


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "engine.sqlite"


@pytest.fixture
async def db(path: Path) -> AsyncIterator[SqliteDatabase]:
    database = SqliteDatabase(str(path))
    await database.connect()
    await database.executescript(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);"
        "CREATE TABLE aza_schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER);"
    )
    try:
        yield database
    finally:
        await database.close()


async def insert(db: SqliteDatabase, i: int) -> int:
    """Insert row i in a transaction that lets the loop run once before it ends."""
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO t (id) VALUES (?)", i)
        await asyncio.sleep(0)
    return i


# -- group commit -------------------------------------------------------------


async def test_a_lone_transaction_runs_without_savepoints(db: SqliteDatabase, path: Path) -> None:
    """With nobody waiting: BEGIN IMMEDIATE, the statements, COMMIT; visible on return."""
    statements = trace(db._writer)
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO t (id) VALUES (1)")
    assert statements == ["BEGIN IMMEDIATE", "INSERT INTO t (id) VALUES (1)", "COMMIT"]
    assert committed_ids(path) == [1]


async def test_concurrent_transactions_share_commits_and_all_commit(
    db: SqliteDatabase, path: Path
) -> None:
    """50 queued transactions commit in a few groups (at most GROUP_LIMIT each), all durable."""
    statements = trace(db._writer)
    before = db.commits
    assert await asyncio.gather(*(insert(db, i) for i in range(50))) == list(range(50))
    commits = statements.count("COMMIT")
    assert commits == db.commits - before
    assert -(-50 // GROUP_LIMIT) <= commits < 50
    assert statements.count("BEGIN IMMEDIATE") == commits
    assert committed_ids(path) == list(range(50))


async def insert_now(db: SqliteDatabase, i: int) -> int:
    """Insert row i in a transaction whose block never yields (as the gateway's do)."""
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO t (id) VALUES (?)", i)
    return i


async def test_transactions_started_in_one_pass_of_the_loop_share_a_commit(
    db: SqliteDatabase, path: Path
) -> None:
    """Blocks that never yield (nobody ever waits for the lock) still commit together."""
    statements = trace(db._writer)
    ids = await asyncio.gather(*(insert_now(db, i) for i in range(20)))
    assert ids == list(range(20))
    # All twenty start in the same pass of the loop: one group, one COMMIT.
    assert statements.count("COMMIT") == 1
    assert statements.count("BEGIN IMMEDIATE") == 1
    assert statements.count("SAVEPOINT aza_member") == 19
    assert committed_ids(path) == list(range(20))


async def test_blocks_queued_behind_a_long_one_all_get_through_in_one_pass(
    db: SqliteDatabase, path: Path
) -> None:
    """When the lock comes free, every queued block runs in the loop's next pass, not one a pass.

    A lock that handed itself to one waiter per release let queued settles
    through one per pass of the loop: under load they piled up by the
    thousand and a gate behind them waited 100-300 ms.
    """
    gate = asyncio.Event()
    holder = asyncio.create_task(slow(db, 0, gate))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(insert_now(db, i)) for i in range(1, 101)]
    await asyncio.sleep(0)
    assert db._queued == 100
    passes = 0
    gate.set()
    while not all(task.done() for task in queued):
        await asyncio.sleep(0)
        passes += 1
        assert passes < 100, "queued blocks got through one per pass of the loop"
    assert passes <= 6  # woken together, run in turn, committed in a few groups
    await holder
    assert committed_ids(path) == list(range(101))


async def returns_within_the_pass(db: SqliteDatabase, i: int) -> bool:
    """Whether a transaction's block returned without letting the loop run (committed at once)."""
    ran: list[bool] = []
    asyncio.get_running_loop().call_soon(ran.append, True)
    await insert_now(db, i)
    return not ran


async def test_at_low_load_commits_stop_waiting_for_company(db: SqliteDatabase, path: Path) -> None:
    """One transaction at a time: after a few lonely deferrals, COMMIT comes at once again."""
    at_once = [await returns_within_the_pass(db, i) for i in range(3 * DEFER_PROBE_EVERY)]
    # The first ones wait a pass for company that never comes ...
    assert at_once[:DEFER_LONELY_LIMIT] == [False] * DEFER_LONELY_LIMIT
    # ... then only the periodic probes do.
    probes = at_once[DEFER_LONELY_LIMIT:].count(False)
    assert 1 <= probes <= 3
    assert committed_ids(path) == list(range(3 * DEFER_PROBE_EVERY))

    # Company again: the first probe in a burst is joined, and deferring resumes.
    statements = trace(db._writer)
    burst = 3 * DEFER_PROBE_EVERY
    await asyncio.gather(*(insert_now(db, 1000 + i) for i in range(burst)))
    assert statements.count("COMMIT") <= DEFER_PROBE_EVERY + burst // GROUP_LIMIT
    statements.clear()
    await asyncio.gather(*(insert_now(db, 2000 + i) for i in range(20)))
    assert statements.count("COMMIT") == 1


async def insert_shared(db: SqliteDatabase, i: int, *, fail: bool = False) -> int:
    """Insert row i in a shared transaction (as the metering store's), raising Boom if asked."""
    async with db.transaction(lock="p", shared=True) as conn:
        await conn.execute("INSERT INTO t (id) VALUES (?)", i)
        if fail:
            raise Boom
    return i


async def test_shared_blocks_of_a_group_skip_their_savepoints(
    db: SqliteDatabase, path: Path
) -> None:
    statements = trace(db._writer)
    assert await asyncio.gather(*(insert_shared(db, i) for i in range(10))) == list(range(10))
    assert statements.count("COMMIT") == 1
    assert not any(statement.startswith("SAVEPOINT") for statement in statements)
    assert committed_ids(path) == list(range(10))


async def test_a_shared_block_raising_fails_its_all_shared_group(
    db: SqliteDatabase, path: Path
) -> None:
    results = await asyncio.gather(
        *(insert_shared(db, i, fail=i == 3) for i in range(6)), return_exceptions=True
    )
    # The earlier ones shared its transaction: rolled back, told so; it gets its own error.
    assert all(isinstance(r, DatabaseUnavailable) for r in results[:3])
    assert isinstance(results[3], Boom)
    # The later ones ran in a new group and committed.
    assert results[4:] == [4, 5]
    assert committed_ids(path) == [4, 5]


async def test_an_unshared_block_keeps_its_savepoint_isolation_among_shared_ones(
    db: SqliteDatabase, path: Path
) -> None:
    statements = trace(db._writer)
    results = await asyncio.gather(
        insert_shared(db, 0),
        insert_now(db, 1),  # unshared: promised that others' failures do not touch it
        insert_shared(db, 2, fail=True),
        insert_shared(db, 3),
        return_exceptions=True,
    )
    assert results[0] == 0 and results[1] == 1 and results[3] == 3
    assert isinstance(results[2], Boom)
    assert committed_ids(path) == [0, 1, 3]
    assert statements.count("ROLLBACK TO aza_member") == 1


async def test_each_block_returns_only_after_its_work_is_committed(
    db: SqliteDatabase, path: Path
) -> None:
    """Right after its block exits, each caller's row is visible to another connection."""
    seen: dict[int, bool] = {}

    async def insert_and_look(i: int) -> None:
        await insert(db, i)
        seen[i] = i in committed_ids(path)

    await asyncio.gather(*(insert_and_look(i) for i in range(20)))
    assert db.commits < 1 + 20  # grouped (the fixture's script counts as one)
    assert seen == dict.fromkeys(range(20), True)


@pytest.mark.parametrize("failing", [0, 4, 9])
async def test_a_failing_block_is_rolled_back_alone(
    db: SqliteDatabase, path: Path, failing: int
) -> None:
    """One block raises (first of its group or not): its rows go, the others commit."""

    async def member(i: int) -> int:
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO t (id) VALUES (?)", i)
            await conn.execute("INSERT INTO t (id) VALUES (?)", 100 + i)
            await asyncio.sleep(0)
            if i == failing:
                raise Boom(i)
        return i

    statements = trace(db._writer)
    results = await asyncio.gather(*(member(i) for i in range(10)), return_exceptions=True)
    assert [type(r) for r in results] == [Boom if i == failing else int for i in range(10)]
    assert statements.count("COMMIT") < 9
    assert committed_ids(path) == sorted(
        [i for i in range(10) if i != failing] + [100 + i for i in range(10) if i != failing]
    )


async def test_a_unique_violation_in_a_group_undoes_only_its_block(
    db: SqliteDatabase, path: Path
) -> None:
    """A member hitting a unique constraint loses its earlier statements too, nobody else's."""

    async def duplicate() -> None:
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO t (id) VALUES (50)")
            await asyncio.sleep(0)
            await conn.execute("INSERT INTO t (id) VALUES (1)")  # taken by the first

    results = await asyncio.gather(
        insert(db, 1), duplicate(), insert(db, 2), return_exceptions=True
    )
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], UniqueViolation)
    assert committed_ids(path) == [1, 2]


async def test_a_failed_commit_fails_every_member_of_its_group(
    db: SqliteDatabase, path: Path
) -> None:
    """A COMMIT that fails (a deferred foreign key) raises in its lone block, or every one."""
    await db.executescript(
        "CREATE TABLE child (id INTEGER PRIMARY KEY, "
        "parent INTEGER REFERENCES t (id) DEFERRABLE INITIALLY DEFERRED)"
    )

    async def orphan() -> None:
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO child (id, parent) VALUES (1, 999)")
            await asyncio.sleep(0)

    with pytest.raises(sqlite3.IntegrityError):
        await orphan()  # alone: its own COMMIT fails
    results = await asyncio.gather(insert(db, 1), orphan(), insert(db, 2), return_exceptions=True)
    assert all(isinstance(r, sqlite3.IntegrityError) for r in results), results
    assert committed_ids(path) == []
    # The engine is usable afterwards: the failed transaction was rolled back.
    assert await insert(db, 3) == 3
    assert committed_ids(path) == [3]


async def test_waiters_cancelled_before_their_turn_do_not_strand_the_group(
    db: SqliteDatabase, path: Path
) -> None:
    """The group held open for queued waiters commits when they are all cancelled instead."""
    gate = asyncio.Event()
    waiters: list[asyncio.Task[int]] = []

    def cancel_waiters() -> None:
        for task in waiters:
            task.cancel()

    async def holder() -> int:
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO t (id) VALUES (1)")
            await gate.wait()
            # Still queued for the lock when this block ends, so the group is
            # held open for them; cancelled before they can take the lock.
            cancel_waiters()
        return 1

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiters.extend(asyncio.create_task(insert(db, i)) for i in (2, 3))
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.wait_for(first, timeout=5) == 1
    assert all(task.cancelled() for task in waiters)
    assert committed_ids(path) == [1]


async def slow(db: SqliteDatabase, i: int, gate: asyncio.Event) -> int:
    """Insert row i in a transaction that ends only once `gate` is set."""
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO t (id) VALUES (?)", i)
        await gate.wait()
    return i


async def open_group(
    db: SqliteDatabase,
) -> tuple[asyncio.Task[int], asyncio.Task[int], asyncio.Event]:
    """Row 1's block ended and waits for its COMMIT; row 2's block runs in its group until set."""
    first_gate, second_gate = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(slow(db, 1, first_gate))
    await asyncio.sleep(0)
    second = asyncio.create_task(slow(db, 2, second_gate))
    await asyncio.sleep(0)  # queued behind the first
    first_gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert not first.done()  # its work waits in the open group
    assert db._group is not None and db._group.members == 2
    return first, second, second_gate


async def test_a_caller_cancelled_while_its_group_commits_leaves_the_group_intact(
    db: SqliteDatabase, path: Path
) -> None:
    """Cancelling one member awaiting the shared COMMIT: the others still commit (and so may it)."""
    first, second, second_gate = await open_group(db)
    first.cancel()
    await asyncio.sleep(0)
    assert first.cancelled()
    second_gate.set()
    assert await asyncio.wait_for(second, timeout=5) == 2
    assert committed_ids(path) == [1, 2]


async def test_reads_see_only_committed_groups(db: SqliteDatabase) -> None:
    """While a group is open, the reader sees none of it; after the COMMIT, all of it."""

    async def count() -> int:
        async with db.read() as conn:
            return int(await conn.fetchval("SELECT COUNT(*) FROM t"))

    first, second, second_gate = await open_group(db)
    assert await count() == 0
    second_gate.set()
    assert await asyncio.gather(first, second) == [1, 2]
    assert await count() == 2


async def test_other_process_lock_then_queued_transactions_commit_together(
    db: SqliteDatabase, path: Path
) -> None:
    """Transactions queued while BEGIN waits for another connection's lock share a COMMIT."""
    statements = trace(db._writer)
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO t (id) VALUES (100)")
        asyncio.get_running_loop().call_later(0.05, other.execute, "COMMIT")

        async def plain(i: int) -> None:
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO t (id) VALUES (?)", i)

        await asyncio.wait_for(asyncio.gather(*(plain(i) for i in range(10))), timeout=5)
    assert statements.count("COMMIT") == 1
    assert committed_ids(path) == [*range(10), 100]


async def test_migration_scripts_run_inside_a_group(db: SqliteDatabase, path: Path) -> None:
    """apply_script_once works as a group member: its DDL and version row commit together."""
    script = "CREATE TABLE m (id INTEGER PRIMARY KEY);\nCREATE INDEX m_id ON m (id);\n"
    results = await asyncio.gather(insert(db, 1), db.apply_script_once(7, script, 0), insert(db, 2))
    assert results == [1, True, 2]
    assert await db.apply_script_once(7, script, 0) is False
    assert db.commits < 1 + 4
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT version FROM aza_schema_migrations").fetchall() == [(7,)]
        assert conn.execute("SELECT COUNT(*) FROM m").fetchone() == (0,)
    assert committed_ids(path) == [1, 2]


async def test_ddl_of_a_failing_member_is_rolled_back(db: SqliteDatabase, path: Path) -> None:
    """A member's CREATE TABLE goes with its savepoint when it raises."""

    async def create_then_fail() -> None:
        async with db.transaction() as conn:
            await conn.execute("CREATE TABLE gone (id INTEGER)")
            await asyncio.sleep(0)
            raise Boom

    results = await asyncio.gather(
        insert(db, 1), create_then_fail(), insert(db, 2), return_exceptions=True
    )
    assert isinstance(results[1], Boom)
    with closing(sqlite3.connect(path)) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "gone" not in tables
    assert committed_ids(path) == [1, 2]


async def test_executescript_commits_an_open_group_first(db: SqliteDatabase, path: Path) -> None:
    """A script run while a group is open does not commit it behind its members' backs."""
    results = await asyncio.gather(
        insert(db, 1),
        db.executescript("CREATE TABLE s (id INTEGER);"),
        insert(db, 2),
    )
    assert results == [1, None, 2]
    assert committed_ids(path) == [1, 2]


# -- checkpoints --------------------------------------------------------------


def fill(n: int, start: int = 1000) -> str:
    """SQL inserting n rows of 4 KB (about one page each) into table t, ids from `start`."""
    return (
        f"WITH RECURSIVE c(i) AS (SELECT {start} UNION ALL SELECT i + 1 FROM c "
        f"WHERE i < {start + n - 1}) INSERT INTO t (id, v) SELECT i, hex(zeroblob(2000)) FROM c"
    )


def size(path: Path | str) -> int:
    """The file's size in bytes; 0 when it does not exist."""
    path = Path(path)
    return path.stat().st_size if path.exists() else 0


async def test_commits_do_not_checkpoint_the_wal_themselves(path: Path) -> None:
    """The writer leaves the WAL alone (wal_autocheckpoint=0); close() checkpoints it."""
    db = SqliteDatabase(str(path), checkpoint_seconds=3600)
    await db.connect()
    await db.executescript("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);")
    before = size(path)
    for i in range(3):  # 3000 pages: past the default auto-checkpoint of 1000
        async with db.transaction() as conn:
            await conn.execute(fill(1000, start=i * 1000))
    assert size(path) == before
    assert size(f"{path}-wal") > 3000 * 4096
    await db.close()
    assert size(path) > 3000 * 4096
    assert size(f"{path}-wal") == 0
    assert len(committed_ids(path)) == 3000


async def test_checkpointer_copies_the_wal_in_a_worker_thread(path: Path) -> None:
    """After commits, the background task checkpoints, off the event loop's thread."""
    db = SqliteDatabase(str(path), checkpoint_seconds=0.05)
    await db.connect()
    try:
        threads: list[int] = []
        assert db._checkpointer is not None
        db._checkpointer.set_trace_callback(lambda _: threads.append(threading.get_ident()))
        await db.executescript("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);")
        async with db.transaction() as conn:
            await conn.execute(fill(500))
        assert size(path) < 500 * 4096
        for _ in range(100):
            await asyncio.sleep(0.05)
            if size(path) > 500 * 4096:
                break
        assert size(path) > 500 * 4096
        assert threads and threading.get_ident() not in threads
        # Nothing committed since: the checkpointer stays idle.
        await asyncio.sleep(0.1)
        ran = len(threads)
        await asyncio.sleep(0.3)
        assert len(threads) == ran
    finally:
        await db.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_steady_writes_keep_the_wal_file_bounded(path: Path) -> None:
    """With commits during every checkpoint, the WAL still rewinds instead of growing on."""
    # Only the commit count triggers checkpoints; the WAL rewinds past 1,000 frames.
    db = SqliteDatabase(str(path), checkpoint_seconds=3600, rewind_frames=1000)
    await db.connect()
    try:
        await db.executescript("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);")
        async with db.transaction() as conn:
            await conn.execute(fill(8, start=0))
        start = db.commits
        while db.commits - start < 40 * CHECKPOINT_COMMITS:
            async with db.transaction() as conn:
                await conn.execute(
                    "UPDATE t SET v = hex(randomblob(1500)) WHERE id = ?", db.commits % 8
                )
            await asyncio.sleep(0)
        # Each commit wrote at least one 4 KB page: 40 MB if the WAL never rewound;
        # it rewinds once past 1,000 frames, a checkpoint round (250 commits) later.
        assert size(f"{path}-wal") < 4 * 1000 * 4096
    finally:
        await db.close()


async def test_a_failing_checkpoint_is_logged_not_raised(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint error shows up in the log; transactions and close() carry on."""
    db = SqliteDatabase(str(path), checkpoint_seconds=0.02)
    await db.connect()
    await db.executescript("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);")
    assert db._checkpointer is not None
    db._checkpointer.close()  # every checkpoint on it now fails
    with caplog.at_level(logging.WARNING, logger="aza.storage.sqlite"):
        for i in range(3):
            async with db.transaction() as conn:
                await conn.execute("INSERT INTO t (id) VALUES (?)", i)
            await asyncio.sleep(0.05)
        await db.close()
    assert any("checkpoint" in record.getMessage() for record in caplog.records)
    assert committed_ids(path) == [0, 1, 2]
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_close_stops_the_checkpointer(db: SqliteDatabase) -> None:
    """close() leaves no task behind and closes all three connections."""
    assert db._checkpoint_task is not None and not db._checkpoint_task.done()
    task = db._checkpoint_task
    await db.close()
    assert task.done() and db._checkpoint_task is None
    assert db._checkpointer is None and db._writer is None and db._reader is None
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_in_memory_database_has_no_checkpointer() -> None:
    """':memory:' still works for transactions; nothing runs in the background."""
    db = SqliteDatabase(":memory:")
    await db.connect()
    try:
        assert db._checkpoint_task is None and db._checkpointer is None
        await db.executescript("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);")
        await asyncio.gather(*(insert(db, i) for i in range(5)))
        async with db.transaction() as conn:
            assert await conn.fetchval("SELECT COUNT(*) FROM t") == 5
    finally:
        await db.close()
