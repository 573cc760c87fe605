"""The databases of the gateway arms: a SQLite file or a PostgreSQL database."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from benchkit.common import BIG_CREDIT_MICRO_USD, PRACTICE, BenchError
from benchkit.procs import run


class Db:
    name: str
    url: str

    def events(self) -> int:
        raise NotImplementedError

    def holds(self) -> int:
        raise NotImplementedError

    def add_credit(self) -> None:
        raise NotImplementedError

    def drop(self) -> None:
        pass


class SqliteDb(Db):
    def __init__(self, path: Path) -> None:
        self.name = "sqlite"
        self.path = path
        self.url = f"sqlite:///{path}"

    def _q(self, sql: str) -> int:
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        try:
            return int(con.execute(sql).fetchone()[0])
        finally:
            con.close()

    def events(self) -> int:
        return self._q("SELECT COUNT(*) FROM ai_usage_events")

    def holds(self) -> int:
        return self._q("SELECT COUNT(*) FROM ai_budget_holds")

    def add_credit(self) -> None:
        con = sqlite3.connect(self.path, timeout=30)
        try:
            con.execute(
                "INSERT INTO ai_credit_ledger (practice_id, event_type, status, "
                "amount_internal_micro_usd, created_at, updated_at) VALUES (?, 'admin_adjustment', "
                "'succeeded', ?, strftime('%s','now'), strftime('%s','now'))",
                (PRACTICE, BIG_CREDIT_MICRO_USD),
            )
            con.commit()
        finally:
            con.close()


class PostgresDb(Db):
    def __init__(self, admin_url: str, dbname: str) -> None:
        self.name = "postgres"
        self.admin = admin_url.rstrip("/") + "/postgres"
        self.dbname = dbname
        self.url = admin_url.rstrip("/") + "/" + dbname
        if shutil.which("psql") is None:
            raise BenchError("psql not found (apt-get install -y postgresql-client)")
        r = run(["psql", self.admin, "-tAc", "select 1"], check=False, timeout=15)
        if r.returncode != 0:
            raise BenchError(f"PostgreSQL not reachable at {self.admin}: {r.stderr.strip()}")
        run(
            [
                "psql",
                self.admin,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)',
            ]
        )
        run(["psql", self.admin, "-v", "ON_ERROR_STOP=1", "-c", f'CREATE DATABASE "{dbname}"'])

    def _q(self, sql: str) -> int:
        return int(run(["psql", self.url, "-tAc", sql]).stdout.strip())

    def events(self) -> int:
        return self._q("SELECT COUNT(*) FROM ai_usage_events")

    def holds(self) -> int:
        return self._q("SELECT COUNT(*) FROM ai_budget_holds")

    def add_credit(self) -> None:
        run(
            [
                "psql",
                self.url,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "INSERT INTO ai_credit_ledger (practice_id, event_type, status, "
                "amount_internal_micro_usd, created_at, updated_at) VALUES "
                f"('{PRACTICE}', 'admin_adjustment', 'succeeded', {BIG_CREDIT_MICRO_USD}, "
                "extract(epoch from now())::bigint, extract(epoch from now())::bigint)",
            ]
        )

    def drop(self) -> None:
        run(
            ["psql", self.admin, "-c", f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)'],
            check=False,
        )
