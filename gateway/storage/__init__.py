"""Storage engines behind one contract (`credit.ports.Database`), and migrations.

`open_database(url)` picks the engine from `AZA_DATABASE_URL`'s form:
`postgresql://…` → PostgreSQL, `sqlite:///path` or a plain path → SQLite.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from importlib import resources

from credit import money_sql
from credit.ports import DatabaseUnavailable, UniqueViolation
from gateway.storage.postgres import PostgresDatabase
from gateway.storage.sqlite import SqliteDatabase, sqlite_path

AnyDatabase = SqliteDatabase | PostgresDatabase

__all__ = [
    "AnyDatabase",
    "DatabaseUnavailable",
    "PostgresDatabase",
    "SqliteDatabase",
    "UniqueViolation",
    "migrate",
    "open_database",
]


def make_database(
    url: str,
    *,
    pool_size: int = 10,
    schema: str | None = None,
    sqlite_synchronous: str = "NORMAL",
) -> AnyDatabase:
    """An unconnected engine for `url` (call `connect()` before use)."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url, pool_size=pool_size, schema=schema)
    return SqliteDatabase(sqlite_path(url), synchronous=sqlite_synchronous)


async def open_database(
    url: str,
    *,
    pool_size: int = 10,
    schema: str | None = None,
    sqlite_synchronous: str = "NORMAL",
) -> AnyDatabase:
    """Connect to `url` and bring its schema up to date."""
    db = make_database(
        url, pool_size=pool_size, schema=schema, sqlite_synchronous=sqlite_synchronous
    )
    await db.connect()
    try:
        await migrate(db)
    except BaseException:
        await db.close()
        raise
    return db


# A migration applies a PostgreSQL function by including its one file, as psql
# would (`\ir ../../functions/aza_settle.sql`); each file says CREATE OR
# REPLACE, so a later migration that includes it again brings a changed
# function to databases made before the change.
_INCLUDE = re.compile(r"^\\ir \.\./\.\./functions/(\w+\.sql)[ \t]*$", re.MULTILINE)


# A migration takes a piece of the money SQL written once (credit/money_sql.py)
# by naming it with the SQL of its argument, `{{ extra_credit(NEW.practice_id) }}`:
# what SQLite's triggers cannot call as a function they include.
_FRAGMENTS: dict[str, Callable[[str], str]] = {"extra_credit": money_sql.extra_credit_sql}
_FRAGMENT = re.compile(r"\{\{ (\w+)\(([\w.]+)\) \}\}")


def _with_includes(script: str) -> str:
    functions = resources.files("gateway.storage") / "functions"
    script = _INCLUDE.sub(lambda m: (functions / m.group(1)).read_text(encoding="utf-8"), script)
    return _FRAGMENT.sub(lambda m: _FRAGMENTS[m.group(1)](m.group(2)), script)


def _migration_files(dialect: str) -> list[tuple[int, str]]:
    folder = resources.files("gateway.storage") / "migrations" / dialect
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, _with_includes(entry.read_text(encoding="utf-8"))))
    return sorted(found)


async def migrate(db: AnyDatabase) -> list[int]:
    """Apply the migrations not yet applied; idempotent. Returns the versions applied now."""
    await db.executescript(
        "CREATE TABLE IF NOT EXISTS aza_schema_migrations "
        "(version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
    )
    applied_now: list[int] = []
    for version, script in _migration_files(db.dialect):
        if isinstance(db, SqliteDatabase):
            # sqlite3 runs a multi-statement script only through executescript;
            # the script and its version row commit together or not at all.
            if await db.apply_script_once(version, script, int(time.time())):
                applied_now.append(version)
            continue
        # The advisory lock makes concurrent starts of several instances apply
        # each migration once; the version check inside it makes re-runs no-ops.
        async with db.transaction(lock="aza:migrations") as conn:
            done = await conn.fetchval(
                "SELECT 1 FROM aza_schema_migrations WHERE version = ?", version
            )
            if done:
                continue
            await conn.execute(script)
            await conn.execute(
                "INSERT INTO aza_schema_migrations (version, applied_at) VALUES (?, ?)",
                version,
                int(time.time()),
            )
        applied_now.append(version)
    return applied_now
