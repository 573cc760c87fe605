"""PostgreSQL engine (asyncpg, pooled): several gateway instances on one ledger.

Per-practice exclusion uses `pg_advisory_xact_lock`, a lock the database
holds until the transaction ends, so two gateway processes serialise their
budget checks for the same practice while other practices run in parallel.
SQL arrives with `?` placeholders (the portable form the stores write) and is
rewritten to `$1, $2, …` once per distinct statement.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from credit.ports import DatabaseUnavailable, Row, UniqueViolation

_PLACEHOLDER = re.compile(r"\?")

# Errors that mean "the database is not there right now", as opposed to a bug
# in a statement: they become DatabaseUnavailable (HTTP 503, retry later).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    TimeoutError,
)


def advisory_key(name: str) -> int:
    """A stable signed 64-bit lock key for `name` (the same in every gateway process)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset on release: our sessions keep no state, so skip asyncpg's reset query.

    The gateway never SETs, LISTENs or takes session-level locks (its advisory
    locks end with their transaction), so the default `RESET ALL; UNLISTEN
    *; …` round trip on every release is pure cost. A connection released
    inside a transaction (a bug or a cancelled request) is rolled back.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


@functools.lru_cache(maxsize=512)
def to_numbered(sql: str) -> str:
    """`?` placeholders to PostgreSQL's `$n` (our SQL never has `?` in literals)."""
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _m: f"${next(counter)}", sql)


class _PgConnection:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            status: str = await self._conn.execute(to_numbered(sql), *args)
        except asyncpg.UniqueViolationError as exc:
            raise UniqueViolation(str(exc)) from exc
        # "INSERT 0 1", "UPDATE 3", "DELETE 0": the count is the last word.
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        try:
            row: Row | None = await self._conn.fetchrow(to_numbered(sql), *args)
        except asyncpg.UniqueViolationError as exc:
            raise UniqueViolation(str(exc)) from exc
        return row

    async def fetchall(self, sql: str, *args: Any) -> Sequence[Row]:
        rows: Sequence[Row] = await self._conn.fetch(to_numbered(sql), *args)
        return rows

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchval(to_numbered(sql), *args)


class PostgresDatabase:
    """A pool of asyncpg connections; transactions lock per practice in the database."""

    dialect = "postgresql"

    def __init__(self, dsn: str, *, pool_size: int = 10, schema: str | None = None) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.schema = schema
        self._pool: asyncpg.Pool | None = None

    async def connect(self) -> None:
        settings = {"search_path": self.schema} if self.schema else None
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                command_timeout=30,
                server_settings=settings,
                reset=_keep_session,
            )
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(f"cannot reach PostgreSQL: {exc}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise DatabaseUnavailable("database is not connected")
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(f"PostgreSQL is unreachable: {exc}") from exc

    @asynccontextmanager
    async def transaction(self, *, lock: str | None = None) -> AsyncIterator[_PgConnection]:
        async with self._acquire() as conn:
            # BEGIN and the lock travel in one round trip (simple protocol,
            # two statements); the key is a number, so nothing is interpolated
            # but digits.
            begin = "BEGIN"
            if lock is not None:
                begin += f"; SELECT pg_advisory_xact_lock({advisory_key(lock)})"
            await conn.execute(begin)
            try:
                yield _PgConnection(conn)
            except BaseException:
                if not conn.is_closed():
                    await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    @asynccontextmanager
    async def read(self) -> AsyncIterator[_PgConnection]:
        async with self._acquire() as conn:
            yield _PgConnection(conn)

    async def executescript(self, script: str) -> None:
        async with self._acquire() as conn:
            await conn.execute(script)

    async def ping(self) -> None:
        async with self.read() as conn:
            await conn.fetchval("SELECT 1")
