"""Shared fixtures: every storage-backed test runs on SQLite and on PostgreSQL.

PostgreSQL comes from AZA_TEST_POSTGRES_URL (default the local server CI
provides). When it is unreachable its tests skip and say why, unless
AZA_TEST_REQUIRE_POSTGRES=1 (set by .ci/run), which turns the skip into a
failure so CI can never pass without them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from budget.pricing import PlanBook
from config import CONFIG_DIR
from gateway.storage import AnyDatabase, open_database
from gateway.storage.metering import MeteringStore

POSTGRES_URL = os.environ.get("AZA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_POSTGRES = os.environ.get("AZA_TEST_REQUIRE_POSTGRES") == "1"

_pg_probe: str | bool | None = False  # False: not probed yet; None: reachable; str: why not


def postgres_unreachable_reason() -> str | None:
    """None when PostgreSQL answers at POSTGRES_URL, else the reason (probed once)."""
    global _pg_probe
    if _pg_probe is False:
        import asyncpg

        async def probe() -> None:
            conn = await asyncpg.connect(POSTGRES_URL, timeout=3)
            await conn.close()

        try:
            # A thread of its own, so this works from inside a running event loop too.
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                pool.submit(asyncio.run, probe()).result()
            _pg_probe = None
        except Exception as exc:
            _pg_probe = (
                f"PostgreSQL not reachable at {POSTGRES_URL} "
                f"({exc.__class__.__name__}: {exc}); set AZA_TEST_POSTGRES_URL"
            )
    return _pg_probe  # type: ignore[return-value]


def skip_without_postgres() -> None:
    reason = postgres_unreachable_reason()
    if reason is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def pg_schema() -> str:
    return "t_" + uuid.uuid4().hex[:16]


async def drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def create_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()


def pg_url_with_schema(schema: str) -> str:
    sep = "&" if "?" in POSTGRES_URL else "?"
    # asyncpg passes unknown DSN query parameters on as server settings.
    return f"{POSTGRES_URL}{sep}search_path={schema}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database URL for each engine (a file, or a PostgreSQL schema)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.sqlite'}"
        return
    skip_without_postgres()
    schema = "t_" + uuid.uuid4().hex[:16]
    await create_schema(schema)
    try:
        yield pg_url_with_schema(schema)
    finally:
        await drop_schema(schema)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[AnyDatabase]:
    """A connected, migrated database on each engine."""
    database = await open_database(database_url, pool_size=20)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def plans() -> PlanBook:
    return PlanBook.load(CONFIG_DIR / "plans.toml")


@pytest.fixture
def metering(db: AnyDatabase, plans: PlanBook) -> MeteringStore:
    return MeteringStore(db, plans=plans)


@pytest.fixture
async def practice(metering: MeteringStore) -> str:
    """The seed's practice `prac_top` with an active `aza_basic_monthly` license (20 USD)."""
    now = int(time.time())
    await metering.upsert_license(
        subscription_id="sub_top",
        practice_id="prac_top",
        lookup_key="aza_basic_monthly",
        status="active",
        period_start=now - 86_400,
        period_end=now + 86_400 * 29,
        customer_id="cus_x",
        customer_email="cli@example.test",
    )
    return "prac_top"
