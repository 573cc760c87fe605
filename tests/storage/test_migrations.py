"""Schema migrations: each applies once, and later ones carry existing rows over."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

from budget.pricing import PlanBook
from config import CONFIG_DIR
from credit.money_sql import extra_credit_sql
from gateway.storage import AnyDatabase, _migration_files, migrate
from gateway.storage.metering import MeteringStore
from gateway.storage.sqlite import SqliteDatabase


async def sqlite_migrated_to(path: Path, last: int) -> SqliteDatabase:
    """A connected SQLite database at `path` with migrations 1 to `last` applied (a past schema)."""
    db = SqliteDatabase(str(path))
    await db.connect()
    await db.executescript(
        "CREATE TABLE IF NOT EXISTS aza_schema_migrations "
        "(version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
    )
    for version, script in _migration_files("sqlite"):
        if version <= last:
            assert await db.apply_script_once(version, script, int(time.time()))
    return db


async def test_every_migration_is_recorded_and_a_rerun_applies_nothing(db: AnyDatabase) -> None:
    versions = [version for version, _ in _migration_files(db.dialect)]
    assert versions[:3] == [1, 2, 3]
    async with db.read() as conn:
        rows = await conn.fetchall("SELECT version FROM aza_schema_migrations ORDER BY version")
    assert [row["version"] for row in rows] == versions
    assert await migrate(db) == []


async def test_holds_in_flight_survive_the_clustered_holds_table(tmp_path: Path) -> None:
    """SQLite 002 rebuilds ai_budget_holds WITHOUT ROWID; a hold placed before it stays."""
    path = tmp_path / "old.sqlite"
    db = await sqlite_migrated_to(path, 1)
    try:
        now = int(time.time())
        metering = MeteringStore(db, plans=PlanBook.load(CONFIG_DIR / "plans.toml"))
        # The license as schema 1 has it (the license store writes columns of later ones).
        async with db.transaction() as conn:
            await conn.execute(
                "INSERT INTO licenses (subscription_id, practice_id, status, lookup_key, "
                "current_period_start, current_period_end, updated_at) "
                "VALUES (?, ?, 'active', ?, ?, ?, ?)",
                "sub_old",
                "prac_old",
                "aza_basic_monthly",
                now - 60,
                now + 86_400,
                now,
            )
        reservation = await metering.reserve("prac_old", request_id="req_old", estimate_micros=5)
        assert reservation.hold is not None

        assert await migrate(db) == [v for v, _ in _migration_files("sqlite")][1:]

        assert await metering.active_holds("prac_old") == 1
        # The hold placed under the old table is released under the new one, once.
        assert await metering.release(reservation.hold) is True
        assert await metering.release(reservation.hold) is False
        assert await metering.active_holds() == 0
    finally:
        await db.close()
    with sqlite3.connect(path) as conn:
        (sql,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'ai_budget_holds'"
        ).fetchone()
        indexes = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'ai_budget_holds'"
        ).fetchall()
    assert "WITHOUT ROWID" in sql
    assert indexes == []  # the primary key is the table; no second b-tree to write


async def test_licenses_carry_the_stripe_event_time_null_unless_a_webhook_set_it(
    db: AnyDatabase,
) -> None:
    """003: licenses.stripe_event_created exists; the metering store's rows leave it NULL."""
    metering = MeteringStore(db, plans=PlanBook.load(CONFIG_DIR / "plans.toml"))
    now = int(time.time())
    await metering.upsert_license(
        subscription_id="sub_admin",
        practice_id="prac_admin",
        lookup_key="aza_basic_monthly",
        period_start=now - 60,
        period_end=now + 86_400,
    )
    async with db.read() as conn:
        value = await conn.fetchval(
            "SELECT stripe_event_created FROM licenses WHERE subscription_id = 'sub_admin'"
        )
    assert value is None


async def test_licenses_from_before_the_event_time_column_keep_their_values(
    tmp_path: Path,
) -> None:
    """SQLite 003 adds licenses.stripe_event_created: an existing row keeps its values, NULL."""
    db = await sqlite_migrated_to(tmp_path / "old.sqlite", 2)
    try:
        async with db.transaction() as conn:
            await conn.execute(
                "INSERT INTO licenses (subscription_id, practice_id, status, lookup_key, "
                "current_period_start, current_period_end, updated_at) "
                "VALUES ('sub_old', 'prac_old', 'past_due', 'aza_pro_monthly', 10, 20, 5)"
            )

        assert 3 in await migrate(db)

        async with db.read() as conn:
            row = await conn.fetchone(
                "SELECT practice_id, status, lookup_key, current_period_start, "
                "current_period_end, updated_at, stripe_event_created FROM licenses"
            )
        assert row is not None
        assert tuple(row) == ("prac_old", "past_due", "aza_pro_monthly", 10, 20, 5, None)
    finally:
        await db.close()


def test_each_postgresql_function_is_defined_in_one_file() -> None:
    """A function is written once: in its own file that migrations include, or in one migration.

    Migration 004 defined the gate and the settle and 005 defined them again
    in full; now both include `functions/<name>.sql`, the one definition.
    """
    storage = Path(__file__).resolve().parents[2] / "gateway" / "storage"
    defines = re.compile(r"CREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\s+(\w+)", re.IGNORECASE)
    includes = re.compile(r"^\\ir \.\./\.\./functions/(\w+)\.sql", re.MULTILINE)
    where: dict[str, list[str]] = {}
    # Where a migration already applied on databases wrote a function that a
    # later migration replaces with its file (migration 012's aza_alert_usage,
    # replaced by 014), that old text is history, not a second definition.
    superseded: set[str] = set()
    migrations = sorted((storage / "migrations" / "postgresql").glob("*.sql"))
    for n, path in enumerate(migrations):
        later = "".join(p.read_text(encoding="utf-8") for p in migrations[n + 1 :])
        for name in set(defines.findall(path.read_text(encoding="utf-8"))):
            if name in includes.findall(later):
                superseded.add(f"{name}@{path.name}")
    files = [*sorted((storage / "migrations").glob("*/*.sql")), *(storage / "functions").glob("*")]
    for path in files:
        for name in set(defines.findall(path.read_text(encoding="utf-8"))):
            if f"{name}@{path.name}" not in superseded:
                where.setdefault(name.lower(), []).append(str(path.relative_to(storage)))
    assert superseded == {"aza_alert_usage@012_limits_alerts.sql"}
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}
    for path in (storage / "functions").glob("*"):
        assert path.suffix == ".sql"
        assert defines.findall(path.read_text(encoding="utf-8")) == [path.stem], path.name
    # Each function file is applied by some migration.
    included = "".join(script for _, script in _migration_files("postgresql"))
    for path in (storage / "functions").glob("*.sql"):
        assert path.read_text(encoding="utf-8") in included, path.name


async def test_a_database_from_before_014_takes_the_money_sql_written_once(
    db: AnyDatabase,
) -> None:
    """014 upgrades a database that has every other migration (016 included): the credit
    alert then reads the extra credit left from the one money SQL of its engine."""
    async with db.transaction() as conn:
        await conn.execute("DELETE FROM aza_schema_migrations WHERE version = 14")
    twelve = dict(_migration_files(db.dialect))[12]
    if isinstance(db, SqliteDatabase):
        # The database as 012 left it: its trigger with its own sums.
        await db.executescript("DROP TRIGGER ai_alert_credit_low;\n" + twelve)
        query = "SELECT sql FROM sqlite_master WHERE name = 'ai_alert_credit_low'"
        written = extra_credit_sql("NEW.practice_id")
    else:
        async with db.transaction() as conn:
            await conn.execute(twelve)
        query = "SELECT prosrc FROM pg_proc WHERE oid = 'aza_alert_usage'::regproc"
        written = "FROM aza_money(NEW.practice_id, NEW.period_start, 0)"
    async with db.read() as conn:
        assert written not in await conn.fetchval(query)
    assert await migrate(db) == [14]
    async with db.read() as conn:
        assert written in await conn.fetchval(query)
