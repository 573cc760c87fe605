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

Durability: `synchronous=NORMAL` by default — in WAL mode a commit survives
a crash of the gateway process; an operating-system crash or power loss can
lose the last commits before the next checkpoint. `AZA_SQLITE_SYNCHRONOUS=FULL`
fsyncs every commit (about 0.2 ms each here) for power-loss durability.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from credit.ports import DatabaseUnavailable, Row, UniqueViolation

# How long a writer waits for another process's write lock before giving up.
LOCK_WAIT_SECONDS = 30.0


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


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


class SqliteDatabase:
    """One writer connection (transactions queued) and one reader connection, WAL mode."""

    dialect = "sqlite"

    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError("synchronous must be NORMAL, FULL or EXTRA")
        self.path = path
        self._synchronous = synchronous.upper()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        # A connection runs one transaction at a time; the lock queues this
        # process's transactions, BEGIN IMMEDIATE queues other processes'.
        self._write_lock = asyncio.Lock()

    def _open(self, *, busy_timeout_ms: int) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    async def connect(self) -> None:
        if self.path not in ("", ":memory:"):
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            # The writer never waits inside SQLite (it retries BEGIN with an
            # asyncio.sleep instead); a reader may briefly, during WAL recovery.
            self._writer = self._open(busy_timeout_ms=0)
            self._reader = self._open(busy_timeout_ms=100)
        except sqlite3.Error as exc:
            raise DatabaseUnavailable(f"cannot open SQLite database: {exc}") from exc

    async def close(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                conn.close()
        self._writer = self._reader = None

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
    async def transaction(self, *, lock: str | None = None) -> AsyncIterator[_SqliteConnection]:
        # `lock` needs nothing more: BEGIN IMMEDIATE already excludes every
        # other writer of the file, which is stronger than a per-key lock.
        del lock
        if self._writer is None:
            raise DatabaseUnavailable("database is not connected")
        async with self._write_lock:
            conn = self._writer
            await self._begin(conn)
            try:
                yield _SqliteConnection(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    @asynccontextmanager
    async def read(self) -> AsyncIterator[_SqliteConnection]:
        if self._reader is None:
            raise DatabaseUnavailable("database is not connected")
        # Statements run to completion without yielding to the loop, so
        # concurrent readers never interleave on this connection.
        yield _SqliteConnection(self._reader)

    async def executescript(self, script: str) -> None:
        """Run a script of DDL (used for the migrations bookkeeping table)."""
        if self._writer is None:
            raise DatabaseUnavailable("database is not connected")
        async with self._write_lock:
            self._writer.executescript(script)

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
