"""A cap lease's spend survives the database dropping the connection that writes it.

The lease's closing write (its spend added to the key's total, its hold
dropped) is retried like a settle. Shown on PostgreSQL: the write waits on
the key's lock, which another session holds; its backend is killed with
`pg_terminate_backend`, the lock let go, and the spend is still written once.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from budget.limits import Limits, Scope, Subject
from gateway.limit_leases import LimitLeases
from gateway.storage import open_database
from gateway.storage.limits import LimitStore, subject_lock
from gateway.storage.postgres import advisory_key
from tests.conftest import POSTGRES_URL, create_schema, drop_schema, pg_url_with_schema

pytestmark = pytest.mark.postgres

USD = 1_000_000


async def _backend_waiting(killer: asyncpg.Connection, app_name: str) -> int | None:
    pid = await killer.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
        "AND wait_event_type = 'Lock' LIMIT 1",
        app_name,
    )
    return None if pid is None else int(pid)


async def test_a_lease_flush_is_retried_after_its_connection_is_killed() -> None:
    from tests.conftest import skip_without_postgres

    skip_without_postgres()
    schema = "t_" + uuid.uuid4().hex[:16]
    app_name = "aza_flush_" + uuid.uuid4().hex[:12]
    await create_schema(schema)
    url = pg_url_with_schema(schema)
    db = await open_database(f"{url}&application_name={app_name}")
    killer = await asyncpg.connect(POSTGRES_URL)
    holder = await asyncpg.connect(POSTGRES_URL)
    try:
        store = LimitStore(db)
        leases = LimitLeases(store, lease_seconds=3600, retry_seconds=30)
        practice = "prac_" + uuid.uuid4().hex[:8]
        subject = Subject(practice, Scope.KEY, "aza_flush1", Limits(monthly_cap_micros=100 * USD))
        cap = await leases.hold_cap(
            subject, hold_id="req-1", estimate_micros=1_000, period_start=1_000
        )
        assert cap is not None and cap.lease is not None  # a lease of 16 estimates
        assert leases.done(cap, 700)  # its request cost 700 micro-USD; the lease still open

        # Another session holds the key's lock: the lease's closing write waits on it.
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute(
            "SELECT pg_advisory_xact_lock($1)", advisory_key(subject_lock(subject))
        )
        closing = asyncio.create_task(leases.aclose())
        pid = None
        for _ in range(500):
            pid = await _backend_waiting(killer, app_name)
            if pid is not None:
                break
            await asyncio.sleep(0.01)
        assert pid is not None, "the lease's write never waited on the lock"
        assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
        await transaction.rollback()  # the lock goes; the retry gets through
        await asyncio.wait_for(closing, 20)

        assert await store.used_micros(subject, 1_000) == 700
        async with db.read() as conn:
            assert await conn.fetchval("SELECT COUNT(*) FROM ai_limit_holds") == 0
    finally:
        await holder.close()
        await killer.close()
        await db.close()
        await drop_schema(schema)
