"""SQLite engine (aiosqlite, WAL): the embedded default for one gateway instance.

Write transactions start with BEGIN IMMEDIATE, which takes SQLite's database
write lock at once: two transactions (in this process or another one on the
same file) cannot interleave their read-check-write steps, which is what makes
holds and pending top-ups race-free here. Readers use a second connection and,
thanks to WAL, never wait for a writer.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from credit.ports import DatabaseUnavailable, Row, UniqueViolation


class _SqliteConnection:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            cursor = await self._conn.execute(sql, args)
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc):
                raise UniqueViolation(str(exc)) from exc
            raise
        return cursor.rowcount

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        try:
            async with self._conn.execute(sql, args) as cursor:
                row: Row | None = await cursor.fetchone()
                return row
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc):
                raise UniqueViolation(str(exc)) from exc
            raise

    async def fetchall(self, sql: str, *args: Any) -> Sequence[Row]:
        async with self._conn.execute(sql, args) as cursor:
            return list(await cursor.fetchall())

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchone(sql, *args)
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
    """One writer connection (serialised) and one reader connection, both in WAL mode."""

    dialect = "sqlite"

    def __init__(self, path: str, *, synchronous: str = "FULL") -> None:
        self.path = path
        self._synchronous = synchronous
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # One connection can run one transaction at a time; the lock queues
        # this process's transactions, BEGIN IMMEDIATE queues other processes'.
        self._write_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()

    async def _open(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=30)
        conn.row_factory = sqlite3.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute(f"PRAGMA synchronous={self._synchronous}")
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=30000")
        return conn

    async def connect(self) -> None:
        if self.path not in ("", ":memory:"):
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await self._open()
            self._reader = await self._open()
        except sqlite3.Error as exc:
            raise DatabaseUnavailable(f"cannot open SQLite database: {exc}") from exc

    async def close(self) -> None:
        for conn in (self._writer, self._reader):
            if conn is not None:
                await conn.close()
        self._writer = self._reader = None

    @asynccontextmanager
    async def transaction(self, *, lock: str | None = None) -> AsyncIterator[_SqliteConnection]:
        # `lock` needs nothing more: BEGIN IMMEDIATE already excludes every
        # other writer of the file, which is stronger than a per-key lock.
        del lock
        if self._writer is None:
            raise DatabaseUnavailable("database is not connected")
        async with self._write_lock:
            conn = self._writer
            try:
                await conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise DatabaseUnavailable(f"cannot start a transaction: {exc}") from exc
            try:
                yield _SqliteConnection(conn)
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            else:
                await conn.execute("COMMIT")

    @asynccontextmanager
    async def read(self) -> AsyncIterator[_SqliteConnection]:
        if self._reader is None:
            raise DatabaseUnavailable("database is not connected")
        async with self._read_lock:
            yield _SqliteConnection(self._reader)

    async def executescript(self, script: str) -> None:
        """Run a migration script (DDL) outside the transaction helpers."""
        if self._writer is None:
            raise DatabaseUnavailable("database is not connected")
        async with self._write_lock:
            await self._writer.executescript(script)

    async def apply_script_once(self, version: int, script: str, now: int) -> bool:
        """Run migration `script` and record `version` in one transaction, unless recorded."""
        if self._writer is None:
            raise DatabaseUnavailable("database is not connected")
        async with self._write_lock:
            conn = self._writer
            await conn.execute("BEGIN IMMEDIATE")
            try:
                async with conn.execute(
                    "SELECT 1 FROM aza_schema_migrations WHERE version = ?", (version,)
                ) as cursor:
                    if await cursor.fetchone() is not None:
                        await conn.execute("ROLLBACK")
                        return False
                # executescript would COMMIT first; run statement by statement instead.
                for statement in split_statements(script):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO aza_schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, now),
                )
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")
            return True

    async def ping(self) -> None:
        async with self.read() as conn:
            await conn.fetchval("SELECT 1")
