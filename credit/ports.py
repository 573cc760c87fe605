"""What the credit package needs from the outside world, as small protocols.

The gateway's storage engines (SQLite, PostgreSQL) implement `Database`; SQL
handed to them uses `?` placeholders and portable syntax (`ON CONFLICT`,
`RETURNING`, partial unique indexes), and each engine adapts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol


class Row(Protocol):
    """A result row, readable by column name or position."""

    def __getitem__(self, key: str | int, /) -> Any: ...


class Connection(Protocol):
    """One connection inside a transaction (or a read-only session)."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; return the number of rows it changed."""
        ...

    async def fetchone(self, sql: str, *args: Any) -> Row | None: ...

    async def fetchall(self, sql: str, *args: Any) -> Sequence[Row]: ...

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """First column of the first row, or None when there is no row."""
        ...


class Database(Protocol):
    """A storage engine: transactions the database itself makes safe."""

    dialect: str

    def transaction(
        self, *, lock: str | None = None, shared: bool = False
    ) -> AbstractAsyncContextManager[Connection]:
        """A write transaction; commits on success, rolls back on any exception.

        `lock` names a key (a practice id) that concurrent transactions, in
        this or another gateway process, must not hold at the same time; the
        engine enforces it in the database (SQLite: the database write lock
        taken by BEGIN IMMEDIATE; PostgreSQL: a transaction advisory lock).

        `shared=True` (with a `lock`) lets the engine run the block in one
        database transaction with other shared blocks on the same key, one
        after another, under one COMMIT (PostgreSQL; SQLite groups every
        transaction already). The block's exit still returns only after the
        COMMIT that holds its work. The price: when another block of the
        group raises, or the COMMIT fails, this one's work is rolled back too
        and its exit raises DatabaseUnavailable (even if the block itself
        raised nothing); and the block must let database errors propagate,
        never catch them and go on. Only for blocks that raise nothing but
        database failures and whose callers retry or report
        DatabaseUnavailable.
        """
        ...

    def read(self) -> AbstractAsyncContextManager[Connection]:
        """A connection for reads that need no lock."""
        ...


class DatabaseUnavailable(Exception):
    """The database could not be reached or failed for reasons not of the caller's making."""


class UniqueViolation(Exception):
    """A unique constraint refused a row: the thing it guards exists already."""
