"""Both engines' schemas say the same: tables, columns, indexes and unique constraints.

The migrations are written twice (`migrations/sqlite`, `migrations/postgresql`);
this reads the live schema each one produces, so a migration added to one
engine and not the other (or differing in a column or index) fails here.
Types are not compared: each engine spells them its own way.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from gateway.storage import open_database

from ..conftest import create_schema, drop_schema, pg_url_with_schema, skip_without_postgres

# (table, columns, unique, partial) per index, primary keys and unique constraints included.
Index = tuple[str, tuple[str, ...], bool, bool]

# Differences made on purpose, each with its reason; nothing else may differ.
# SQLite migration 002 clusters the holds table WITHOUT ROWID on
# (practice_id, hold_id): one page written per hold instead of three. Hold
# ids are unique by construction (96 random bits per store and a counter).
ONLY_SQLITE: set[Index] = {("ai_budget_holds", ("practice_id", "hold_id"), True, False)}
ONLY_POSTGRES: set[Index] = {
    ("ai_budget_holds", ("hold_id",), True, False),
    ("ai_budget_holds", ("practice_id", "expires_at"), False, False),
}


async def sqlite_schema(path: Path) -> tuple[dict[str, set[str]], set[Index]]:
    db = await open_database(f"sqlite:///{path}")
    try:
        async with db.read() as conn:
            tables = [
                str(row["name"])
                for row in await conn.fetchall(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%'"
                )
            ]
            columns: dict[str, set[str]] = {}
            indexes: set[Index] = set()
            for table in tables:
                # table_xinfo: generated columns too.
                info = await conn.fetchall(f"PRAGMA table_xinfo('{table}')")
                columns[table] = {str(row["name"]) for row in info}
                # A primary key is a unique index on PostgreSQL; SQLite's rowid
                # tables keep an INTEGER one as the rowid, without an index.
                pk = tuple(
                    str(row["name"])
                    for row in sorted(info, key=lambda r: int(r["pk"]))
                    if int(row["pk"])
                )
                if pk:
                    indexes.add((table, pk, True, False))
                for index in await conn.fetchall(f"PRAGMA index_list('{table}')"):
                    if index["origin"] == "pk":
                        continue
                    cols = tuple(
                        str(row["name"])
                        for row in await conn.fetchall(f"PRAGMA index_info('{index['name']}')")
                    )
                    indexes.add((table, cols, bool(index["unique"]), bool(index["partial"])))
        return columns, indexes
    finally:
        await db.close()


async def postgres_schema(schema: str) -> tuple[dict[str, set[str]], set[Index]]:
    db = await open_database(pg_url_with_schema(schema))
    try:
        async with db.read() as conn:
            columns: dict[str, set[str]] = {}
            for row in await conn.fetchall(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = ?",
                schema,
            ):
                columns.setdefault(str(row["table_name"]), set()).add(str(row["column_name"]))
            indexes: set[Index] = set()
            for row in await conn.fetchall(
                "SELECT t.relname AS tab, i.indisunique AS uniq, "
                "i.indpred IS NOT NULL AS partial, "
                "ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) "
                "JOIN pg_attribute AS a ON a.attrelid = t.oid AND a.attnum = k.attnum "
                "ORDER BY k.n) AS cols "
                "FROM pg_index AS i JOIN pg_class AS t ON t.oid = i.indrelid "
                "JOIN pg_namespace AS n ON n.oid = t.relnamespace WHERE n.nspname = ?",
                schema,
            ):
                indexes.add(
                    (str(row["tab"]), tuple(row["cols"]), bool(row["uniq"]), bool(row["partial"]))
                )
        return columns, indexes
    finally:
        await db.close()


@pytest.mark.postgres
async def test_both_engines_make_the_same_tables_columns_and_indexes(tmp_path: Path) -> None:
    """Every table, column, index and unique constraint exists on both engines alike."""
    skip_without_postgres()
    schema = "t_" + uuid.uuid4().hex[:16]
    await create_schema(schema)
    try:
        pg_columns, pg_indexes = await postgres_schema(schema)
    finally:
        await drop_schema(schema)
    lite_columns, lite_indexes = await sqlite_schema(tmp_path / "schema.sqlite")

    assert sorted(lite_columns) == sorted(pg_columns)
    for table in sorted(pg_columns):
        assert lite_columns[table] == pg_columns[table], table
    assert lite_indexes - pg_indexes == ONLY_SQLITE
    assert pg_indexes - lite_indexes == ONLY_POSTGRES
