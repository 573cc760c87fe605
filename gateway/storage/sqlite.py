"""SQLite engine (WAL): the embedded default for one gateway instance.

Statements run on the event loop's own thread, straight through the stdlib
`sqlite3` module. On a local file a statement takes microseconds; handing
each one to a worker thread (as aiosqlite does) cost about 80 µs of CPU per
statement in our measurements — 1 ms per proxied request, more than all the
SQL itself — so the engine does not. Nothing here waits on the network, and
lock waits never block the loop (see below).

Write transactions start with BEGIN IMMEDIATE, which takes SQLite's database
write lock at once: two transactions (in this process or another one on the
same file) cannot interleave their read-check-write steps, which is what makes
holds and pending top-ups race-free here. When another process holds the
lock, BEGIN fails at once (busy timeout 0) and is retried after an
`asyncio.sleep`, so the loop keeps serving. Readers use a second connection
and, thanks to WAL, never wait for a writer.

Group commit: this process's write transactions queue for the one writer
connection. When a transaction's block ends while others already wait for
it, the COMMIT is put off: the SQLite transaction stays open, the waiters'
blocks run inside it one after another, each in a SAVEPOINT of its own, and
one COMMIT ends them all (at most `GROUP_LIMIT` blocks; none joins a group
held open for longer than `GROUP_SECONDS`). Statements do not yield to the
loop, so a block rarely has to wait: under load, the transactions of many
requests run one after another in the same pass of the loop. So a block's
COMMIT is also put off when nobody waits, until the loop's next pass, and
the blocks that start before then join it; at low load, where nobody does,
this stops after a few lonely groups but for an occasional probe (see
`_hold_open`). A block that raises is rolled back to its savepoint and only
its caller sees the exception. Blocks opened with `shared=True` (the
metering store's, which raise nothing but database failures) skip their
savepoints while every block of the group is shared: one of them raising
rolls the whole group back, and the others' exits raise
DatabaseUnavailable, as on PostgreSQL. This is safe because the blocks still run
one at a time on the same connection, in the order they come, so each sees
exactly what it would have seen as a transaction of its own (the earlier
blocks' writes; other connections see none of them before the COMMIT), and
because no caller's `async with` returns before the COMMIT that holds its
work: when that COMMIT fails, every caller of the group gets the exception.
The price: a block's caller also waits for the later blocks of its group
(within a pass of the loop), so a transaction block must never wait for
something another caller does only after its own transaction returned.

Checkpoints: the writer does not checkpoint the WAL inside its COMMITs
(`wal_autocheckpoint=0`), where the copy and its fsync would stall the loop.
A background task runs `PRAGMA wal_checkpoint(PASSIVE)` in a worker thread,
on a third connection: once a second when something was committed since the
last one, as soon as `CHECKPOINT_COMMITS` commits have piled up, and once
more on close. SQLite rewinds the WAL file only when a write transaction
starts with all of it copied, which never happens while commits go on during
every checkpoint; so when some did, the task copies the rest again (a few
pages, and the fsyncs) holding the write lock: this process's transactions
wait for it, the loop does not, and they then commit as one group. The task
needs the loop to run now and then; work that never yields to it lets the
WAL grow until it does. Not for in-memory databases.

Durability: `synchronous=NORMAL` by default — in WAL mode a commit survives
a crash of the gateway process; an operating-system crash or power loss can
lose the commits since the last checkpoint (at most about a second's worth).
`AZA_SQLITE_SYNCHRONOUS=FULL` fsyncs every commit (about 0.2 ms each here)
for power-loss durability.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from credit.ports import Connection, DatabaseUnavailable, Row, UniqueViolation

log = logging.getLogger("aza.storage.sqlite")

# How long a writer waits for another process's write lock before giving up.
LOCK_WAIT_SECONDS = 30.0
# Group commit: at most this many transaction blocks share one COMMIT, and
# none joins a group first held open longer ago than this.
GROUP_LIMIT = 32
GROUP_SECONDS = 0.010
# A transaction nobody waits for may still be held open until the loop's next
# pass, for the blocks that start meanwhile (see `_hold_open`). After this
# many such groups in a row that nobody joined, only every
# DEFER_PROBE_EVERY-th COMMIT is put off, until one is joined again.
DEFER_LONELY_LIMIT = 4
DEFER_PROBE_EVERY = 32
# The background checkpointer runs this often when something was committed,
# and sooner once this many COMMITs (some 4 WAL pages each) have piled up.
CHECKPOINT_SECONDS = 1.0
CHECKPOINT_COMMITS = 250
# Past this many WAL frames (4 KiB each) the checkpointer holds writes back
# for one short pass so that SQLite can rewind the WAL (see _checkpoint_loop).
REWIND_FRAMES = 16_384


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


class _PassLock:
    """A lock whose release wakes every waiter at once, not the first one only.

    asyncio.Lock hands itself to one waiter per release, and that waiter
    runs in the loop's next pass: once transaction blocks queue, they get
    through one per pass of the loop, however short they are. Settles (which
    no client waits for) then pile up faster than they drain, and a request
    whose gate needs the database waits behind all of them: with leases
    admitting most requests without the database, 1,300 settles queued and
    gates waited 100-300 ms. Here a release wakes them all; they run in the
    next pass in the order they came, and since a block's statements do not
    yield, each takes the lock, runs and releases in turn within that pass,
    joining the same group. One that finds the lock taken waits again.
    """

    def __init__(self) -> None:
        self._locked = False
        self._waiters: list[asyncio.Future[None]] = []

    def locked(self) -> bool:
        return self._locked

    async def acquire(self) -> None:
        while self._locked:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if not waiter.done():
                    self._waiters.remove(waiter)
                raise
        self._locked = True

    def release(self) -> None:
        self._locked = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class _SqliteConnection:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def _run(self, sql: str, args: tuple[Any, ...]) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, args)
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc):
                raise UniqueViolation(str(exc)) from exc
            raise
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise DatabaseUnavailable(f"SQLite is locked: {exc}") from exc
            raise

    async def execute(self, sql: str, *args: Any) -> int:
        return self._run(sql, args).rowcount

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = self._run(sql, args).fetchone()
        return row

    async def fetchall(self, sql: str, *args: Any) -> Sequence[Row]:
        return list(self._run(sql, args).fetchall())

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = self._run(sql, args).fetchone()
        return None if row is None else row[0]


def split_statements(script: str) -> list[str]:
    """Split a migration script into complete statements (sqlite3.complete_statement)."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip():
        statements.append(pending.strip())
    return statements


def sqlite_path(url: str) -> str:
    """The file path of a `sqlite:///path` URL or a plain path."""
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///") :]
    if url.startswith("sqlite://"):
        return url[len("sqlite://") :]
    return url


class _Group:
    """Transaction blocks sharing one SQLite transaction and its COMMIT."""

    __slots__ = ("all_shared", "committed", "deferred", "error", "members", "started")

    def __init__(self, *, shared: bool) -> None:
        self.members = 1
        # Every block so far was `shared`: a shared block may then skip its
        # savepoint, as all of them accepted to fail together.
        self.all_shared = shared
        self.deferred = False  # held open with nobody waiting, on the chance of company
        # Made when the group is first held open for waiters (a lone
        # transaction needs none); done when the COMMIT succeeded or failed.
        self.committed: asyncio.Future[None] | None = None
        self.started = 0.0  # loop time when first held open
        self.error: BaseException | None = None  # why the group failed


class SqliteDatabase:
    """One writer connection (transactions queued, group commit), one reader, WAL mode."""

    dialect = "sqlite"
    has_gate_functions = False  # SQLite has no stored functions

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "NORMAL",
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        rewind_frames: int = REWIND_FRAMES,
    ) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError("synchronous must be NORMAL, FULL or EXTRA")
        self.path = path
        self._synchronous = synchronous.upper()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        # A connection runs one transaction at a time; the lock queues this
        # process's transaction blocks, BEGIN IMMEDIATE queues other processes'.
        self._write_lock = _PassLock()
        self._queued = 0  # transaction blocks waiting for the lock
        self._lonely = 0  # deferred groups in a row that nobody joined
        self._group: _Group | None = None  # the open SQLite transaction, if any
        # COMMITs this engine ran (a group counts once); tests and the checkpointer read it.
        self.commits = 0
        self._checkpoint_seconds = checkpoint_seconds
        self._rewind_frames = rewind_frames
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpointer_mutex = threading.Lock()  # one checkpoint at a time
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._checkpoint_due = asyncio.Event()  # set when CHECKPOINT_COMMITS piled up
        self._checkpointed_at = 0  # `commits` when the last checkpoint started

    def _open(self, *, busy_timeout_ms: int) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    async def connect(self) -> None:
        on_disk = self.path not in ("", ":memory:")
        if on_disk:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            # The writer never waits inside SQLite (it retries BEGIN with an
            # asyncio.sleep instead); a reader may briefly, during WAL recovery.
            self._writer = self._open(busy_timeout_ms=0)
            self._reader = self._open(busy_timeout_ms=100)
            wal = self._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            if on_disk and wal:
                # Checkpoints run in the background task, off the loop's thread.
                self._writer.execute("PRAGMA wal_autocheckpoint=0")
                self._checkpointer = self._open(busy_timeout_ms=100)
        except sqlite3.Error as exc:
            raise DatabaseUnavailable(f"cannot open SQLite database: {exc}") from exc
        if self._checkpointer is not None:
            self._checkpoint_task = asyncio.get_running_loop().create_task(
                self._checkpoint_loop(), name=f"sqlite checkpoints of {self.path}"
            )

    async def close(self) -> None:
        task, self._checkpoint_task = self._checkpoint_task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        if self._group is not None and not self._write_lock.locked():
            self._end_group()
        for conn in (self._writer, self._reader):
            if conn is not None:
                conn.close()
        self._writer = self._reader = None
        if self._checkpointer is not None:
            # Last connection to close: SQLite checkpoints once more and
            # removes the WAL file, in the worker thread too.
            await asyncio.to_thread(self._close_checkpointer)

    # -- checkpoints --------------------------------------------------------

    async def _checkpoint_loop(self) -> None:
        complete = False  # the first round checkpoints whatever the WAL holds already
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._checkpoint_seconds):
                    await self._checkpoint_due.wait()
            self._checkpoint_due.clear()
            if self.commits == self._checkpointed_at and complete:
                continue
            self._checkpointed_at = self.commits
            complete, frames = await asyncio.to_thread(self._checkpoint)
            if self.commits == self._checkpointed_at or frames < self._rewind_frames:
                continue
            # COMMITs during the checkpoint added WAL frames behind it, and
            # SQLite rewinds the WAL file only when a write transaction starts
            # with all of it copied: under steady writes it would grow without
            # end. Once it is large, copy the rest with this process's writes
            # held back (they wait a few ms, the loop does not; they commit as
            # a group after). Not every time: that stall, every quarter
            # second under load, was the gateway's 99th percentile at
            # concurrency 1.
            async with self._write_lock:
                if self._group is not None:
                    self._end_group()
                self._checkpointed_at = self.commits
                complete, frames = await asyncio.to_thread(self._checkpoint)

    def _checkpoint(self) -> tuple[bool, int]:
        """One PASSIVE checkpoint (worker thread): (WAL copied entirely, frames in the WAL)."""
        with self._checkpointer_mutex:
            conn = self._checkpointer
            if conn is None:
                return True, 0
            try:
                busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except Exception:
                log.warning("SQLite checkpoint of %s failed", self.path, exc_info=True)
                return False, 0
            return not busy and copied == frames, frames

    def _close_checkpointer(self) -> None:
        self._checkpoint()
        with self._checkpointer_mutex:
            conn, self._checkpointer = self._checkpointer, None
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    log.warning(
                        "closing SQLite checkpointer of %s failed", self.path, exc_info=True
                    )

    # -- write transactions ---------------------------------------------------

    async def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, waiting (without blocking the loop) for another process's lock."""
        delay, waited = 0.001, 0.0
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or waited >= LOCK_WAIT_SECONDS:
                    raise DatabaseUnavailable(f"cannot start a transaction: {exc}") from exc
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.05)

    @asynccontextmanager
    async def transaction(
        self, *, lock: str | None = None, shared: bool = False
    ) -> AsyncIterator[_SqliteConnection]:
        """A write transaction; the block's exit waits for the COMMIT that holds its work.

        A caller cancelled while it waits for that COMMIT gets CancelledError,
        but its work stays in its group and may still be committed.
        """
        # `lock` needs nothing more: BEGIN IMMEDIATE already excludes every
        # other writer of the file, which is stronger than a per-key lock.
        del lock
        conn = self._writer
        if conn is None:
            raise DatabaseUnavailable("database is not connected")
        self._queued += 1
        try:
            await self._write_lock.acquire()
        finally:
            self._queued -= 1
        try:
            group, first, savepoint = await self._join(conn, shared=shared)
            try:
                try:
                    yield _SqliteConnection(conn)
                except BaseException as exc:
                    self._undo_member(conn, group, first, savepoint, exc)
                    raise
                self._keep_member(conn, group, savepoint)
            finally:
                if self._group is group and not self._hold_open(group):
                    self._end_group()
        finally:
            self._write_lock.release()
            if self._group is not None:
                # The waiters it is held open for may all be cancelled before
                # they get the lock: commit then, whoever is left.
                asyncio.get_running_loop().call_soon(self._commit_if_idle)
        if group.committed is not None:
            # Shared by the group: one caller's cancellation must not cancel it.
            await asyncio.shield(group.committed)
        elif group.error is not None:
            raise group.error

    async def _join(self, conn: sqlite3.Connection, *, shared: bool) -> tuple[_Group, bool, bool]:
        """The open group (with a savepoint for the block unless it may fail with the
        group), else a new group; (group, first, savepoint)."""
        group = self._group
        if group is not None and not conn.in_transaction:
            # Cannot happen unless SQLite rolled back by itself; never start
            # a transaction with a SAVEPOINT, that would hide the loss.
            self._fail_group(group, DatabaseUnavailable("SQLite rolled the transaction back"))
            group = None
        if group is None:
            await self._begin(conn)
            group = self._group = _Group(shared=shared)
            return group, True, False
        group.all_shared = group.all_shared and shared
        if group.all_shared:
            # The metering store's blocks (shared=True) raise nothing but
            # database failures; two statements fewer per block.
            group.members += 1
            return group, False, False
        try:
            conn.execute("SAVEPOINT aza_member")
        except sqlite3.Error:
            self._end_group()  # the earlier blocks' work is fine; commit it
            raise
        group.members += 1
        return group, False, True

    def _undo_member(
        self,
        conn: sqlite3.Connection,
        group: _Group,
        first: bool,
        savepoint: bool,
        exc: BaseException,
    ) -> None:
        """Roll back the block that raised: the whole transaction if it had no savepoint."""
        if not first and not savepoint:
            # A shared block of an all-shared group: the group fails with it;
            # the others' exits raise DatabaseUnavailable, this one its own error.
            self._fail_group(
                group,
                DatabaseUnavailable(
                    f"rolled back with another transaction of its group ({exc.__class__.__name__})"
                ),
            )
            return
        if first:
            # Nobody else's work is in the transaction yet.
            self._group = None
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.warning("SQLite ROLLBACK failed", exc_info=True)
            return
        try:
            conn.execute("ROLLBACK TO aza_member")
            conn.execute("RELEASE aza_member")
        except sqlite3.Error as exc:
            # SQLite rolled the whole transaction back (an I/O error, say).
            self._fail_group(
                group, DatabaseUnavailable(f"SQLite rolled the transaction back: {exc}")
            )

    def _keep_member(self, conn: sqlite3.Connection, group: _Group, savepoint: bool) -> None:
        """Keep a finished block's work in the group's transaction."""
        try:
            if savepoint:
                conn.execute("RELEASE aza_member")
            lost = not conn.in_transaction
        except sqlite3.Error:
            lost = True
        if lost:
            # The block swallowed an error after which SQLite rolled back.
            self._fail_group(group, DatabaseUnavailable("SQLite rolled the transaction back"))

    def _hold_open(self, group: _Group) -> bool:
        """Whether to leave the group open for more blocks instead of committing now.

        Blocks waiting for the lock join it. But statements never yield to
        the loop, so within one process a block almost never has to wait:
        under load the transactions of many requests run one after another
        in the same pass of the loop, each with its own COMMIT. So a group
        nobody waits for is also held open, until the `_commit_if_idle`
        callback that its release schedules runs in the loop's next pass;
        the blocks that start before then join it. At low load nobody does,
        and the deferral is only cost (a future and a pass of the loop per
        transaction): after DEFER_LONELY_LIMIT lonely groups in a row, only
        one COMMIT in DEFER_PROBE_EVERY is put off, as a probe.
        """
        if group.members >= GROUP_LIMIT:
            return False
        loop = asyncio.get_running_loop()
        if group.committed is None:
            if not self._queued:
                probe = self.commits % DEFER_PROBE_EVERY == 0
                if self._lonely >= DEFER_LONELY_LIMIT and not probe:
                    return False
                group.deferred = True
            group.committed = loop.create_future()
            group.started = loop.time()
            return True
        return loop.time() - group.started < GROUP_SECONDS

    def _commit_if_idle(self) -> None:
        """COMMIT the open group unless a transaction block holds or is about to take the lock."""
        if self._group is None or self._write_lock.locked():
            return  # the holder decides when its block ends
        if self._queued:
            # A woken waiter has not run yet. It takes the lock, or if it was
            # cancelled, the lock wakes the next one; look again after that.
            asyncio.get_running_loop().call_soon(self._commit_if_idle)
            return
        self._end_group()

    def _end_group(self) -> None:
        """COMMIT the open group and tell its members how it went."""
        group, self._group = self._group, None
        assert group is not None
        if self._writer is None:  # closed under its members' feet
            self._set_failed(group, DatabaseUnavailable("database is not connected"))
            return
        try:
            self._writer.execute("COMMIT")
        except sqlite3.Error as exc:
            error: BaseException = exc
            if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
                error = DatabaseUnavailable(f"SQLite is locked: {exc}")
                error.__cause__ = exc
            self._rollback()
            self._set_failed(group, error)
            return
        self.commits += 1
        if group.deferred:
            self._lonely = 0 if group.members > 1 else self._lonely + 1
        if self.commits - self._checkpointed_at >= CHECKPOINT_COMMITS:
            self._checkpoint_due.set()
        if group.committed is not None:
            group.committed.set_result(None)

    def _fail_group(self, group: _Group, error: BaseException) -> None:
        if self._group is group:
            self._group = None
            self._rollback()
        self._set_failed(group, error)

    def _rollback(self) -> None:
        if self._writer is not None and self._writer.in_transaction:
            try:
                self._writer.execute("ROLLBACK")
            except sqlite3.Error:
                log.warning("SQLite ROLLBACK failed", exc_info=True)

    @staticmethod
    def _set_failed(group: _Group, error: BaseException) -> None:
        group.error = error
        if group.committed is not None and not group.committed.done():
            group.committed.set_exception(error)
            # Its members raise it; none left (all cancelled) is no error to log.
            group.committed.exception()

    # -- reads and scripts ----------------------------------------------------

    @asynccontextmanager
    async def read(self) -> AsyncIterator[_SqliteConnection]:
        if self._reader is None:
            raise DatabaseUnavailable("database is not connected")
        # Statements run to completion without yielding to the loop, so
        # concurrent readers never interleave on this connection.
        yield _SqliteConnection(self._reader)

    # -- what the metering store asks of an engine (gateway.storage.engine) --------

    def lock_number(self, name: str) -> int:
        raise NotImplementedError("SQLite has no numbered locks (and no gate functions)")

    async def lock_also(self, conn: Connection, name: str) -> None:
        """Nothing to take: a write transaction holds the database's one write lock."""

    async def vacuum(self, table: str) -> bool:
        """False: SQLite reuses the space of deleted rows by itself."""
        return False

    async def executescript(self, script: str) -> None:
        """Run a script of DDL (used for the migrations bookkeeping table)."""
        if self._writer is None:
            raise DatabaseUnavailable("database is not connected")
        async with self._write_lock:
            if self._group is not None:
                # executescript would COMMIT the open group behind its members' backs.
                self._end_group()
            self._writer.executescript(script)
            self.commits += 1

    async def apply_script_once(self, version: int, script: str, now: int) -> bool:
        """Run migration `script` and record `version` in one transaction, unless recorded."""
        async with self.transaction() as conn:
            if await conn.fetchval(
                "SELECT 1 FROM aza_schema_migrations WHERE version = ?", version
            ):
                return False
            # executescript would COMMIT first; run statement by statement instead.
            for statement in split_statements(script):
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO aza_schema_migrations (version, applied_at) VALUES (?, ?)",
                version,
                now,
            )
            return True

    async def ping(self) -> None:
        async with self.read() as conn:
            await conn.fetchval("SELECT 1")
