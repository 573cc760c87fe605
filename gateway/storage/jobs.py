"""The queue of upstream jobs the gateway follows (table `aza_upstream_jobs`, migration 010).

A job is an upstream object that runs on after the request that started it
(a batch, a background response) and that the gateway must poll until it
ends, to charge what it used. Rows are claimed with a lease: one
conditional UPDATE sets `lease_owner` and `lease_until` on due rows whose
lease has run out, so two instances on one database never poll the same job
at once, and a job whose instance died is taken over once its lease ends.
Every write after the claim names the owner, so an instance whose lease
was taken over meanwhile changes nothing.

Times are integer milliseconds since the epoch. `gateway.followers` runs the
polling loop on top of this store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from credit.ports import Connection, Database, Row

OPEN = "open"
DONE = "done"
_COLUMNS = "kind, job_id, practice_id, payload_json, attempts, created_at"


@dataclass(frozen=True, slots=True)
class Job:
    """One followed upstream job, as claimed by an instance.

    `payload`: what the job's starter stored with it (small JSON); `attempts`:
    polls since it was added that did not end it (the backoff grows with it).
    """

    kind: str
    job_id: str
    practice_id: str
    payload: Mapping[str, Any]
    attempts: int
    created_at_ms: int


def _job(row: Row) -> Job:
    return Job(
        kind=row["kind"],
        job_id=row["job_id"],
        practice_id=row["practice_id"],
        payload=MappingProxyType(json.loads(row["payload_json"] or "{}")),
        attempts=int(row["attempts"]),
        created_at_ms=int(row["created_at"]),
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


class JobStore:
    """`aza_upstream_jobs` on one `Database`."""

    def __init__(self, db: Database, *, clock_ms: Callable[[], int] = _now_ms) -> None:
        self.db = db
        self._clock_ms = clock_ms

    def now_ms(self) -> int:
        return self._clock_ms()

    async def add(
        self,
        kind: str,
        job_id: str,
        *,
        practice_id: str,
        payload: Mapping[str, Any] | None = None,
        first_poll_in_ms: int = 0,
        conn: Connection | None = None,
    ) -> bool:
        """Queue a job (inside `conn`'s transaction when given). False if queued before."""
        now = self.now_ms()
        args = (
            kind,
            job_id,
            practice_id,
            json.dumps(dict(payload or {}), separators=(",", ":")),
            OPEN,
            now + first_poll_in_ms,
            now,
            now,
        )
        sql = (
            "INSERT INTO aza_upstream_jobs (kind, job_id, practice_id, payload_json, state, "
            "next_poll_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (kind, job_id) DO NOTHING"
        )
        if conn is not None:
            return await conn.execute(sql, *args) > 0
        async with self.db.transaction() as tx:
            return await tx.execute(sql, *args) > 0

    async def claim(
        self, kinds: Sequence[str], *, owner: str, lease_ms: int, limit: int = 16
    ) -> list[Job]:
        """Lease up to `limit` due open jobs of `kinds` to `owner` for `lease_ms`.

        The lease conditions stand in the UPDATE's own WHERE, not only in the
        subquery that picks the rows: PostgreSQL re-checks them on a row
        another instance changed meanwhile (READ COMMITTED), so of two
        instances claiming at once, one gets each row.
        """
        if not kinds:
            return []
        now = self.now_ms()
        marks = ", ".join("?" * len(kinds))
        due = f"state = '{OPEN}' AND kind IN ({marks}) AND next_poll_at <= ? AND lease_until <= ?"
        async with self.db.transaction() as conn:
            rows = await conn.fetchall(
                f"UPDATE aza_upstream_jobs SET lease_owner = ?, lease_until = ?, updated_at = ? "
                f"WHERE {due} AND (kind, job_id) IN (SELECT kind, job_id FROM aza_upstream_jobs "
                f"WHERE {due} ORDER BY next_poll_at LIMIT ?) RETURNING {_COLUMNS}",
                owner,
                now + lease_ms,
                now,
                *kinds,
                now,
                now,
                *kinds,
                now,
                now,
                limit,
            )
        return [_job(row) for row in rows]

    async def again(
        self,
        job: Job,
        *,
        owner: str,
        in_ms: int,
        error: str | None = None,
        payload: Mapping[str, Any] | None = None,
    ) -> bool:
        """Poll `job` again in `in_ms` and give up the lease. False if `owner` lost it."""
        now = self.now_ms()
        async with self.db.transaction() as conn:
            changed = await conn.execute(
                "UPDATE aza_upstream_jobs SET next_poll_at = ?, attempts = attempts + 1, "
                "lease_owner = NULL, lease_until = 0, last_error = ?, updated_at = ?, "
                "payload_json = COALESCE(?, payload_json) "
                "WHERE kind = ? AND job_id = ? AND lease_owner = ? AND state = ?",
                now + max(0, in_ms),
                error,
                now,
                None if payload is None else json.dumps(dict(payload), separators=(",", ":")),
                job.kind,
                job.job_id,
                owner,
                OPEN,
            )
        return changed > 0

    async def finish(self, job: Job, *, owner: str, conn: Connection | None = None) -> bool:
        """Mark `job` done (inside `conn`'s transaction when given). False if `owner` lost it."""
        sql = (
            "UPDATE aza_upstream_jobs SET state = ?, lease_owner = NULL, lease_until = 0, "
            "updated_at = ? WHERE kind = ? AND job_id = ? AND lease_owner = ? AND state = ?"
        )
        args = (DONE, self.now_ms(), job.kind, job.job_id, owner, OPEN)
        if conn is not None:
            return await conn.execute(sql, *args) > 0
        async with self.db.transaction() as tx:
            return await tx.execute(sql, *args) > 0

    async def close(self, conn: Connection, kind: str, job_id: str) -> bool:
        """Mark an open job done whoever holds its lease, inside `conn`'s transaction: what
        it waited for happened elsewhere. False when it was not open."""
        return (
            await conn.execute(
                "UPDATE aza_upstream_jobs SET state = ?, lease_owner = NULL, lease_until = 0, "
                "updated_at = ? WHERE kind = ? AND job_id = ? AND state = ?",
                DONE,
                self.now_ms(),
                kind,
                job_id,
                OPEN,
            )
            > 0
        )

    async def extend(self, job: Job, *, owner: str, lease_ms: int) -> bool:
        """Keep `owner`'s lease on `job` for `lease_ms` more (a long poll). False if lost."""
        now = self.now_ms()
        async with self.db.transaction() as conn:
            changed = await conn.execute(
                "UPDATE aza_upstream_jobs SET lease_until = ?, updated_at = ? "
                "WHERE kind = ? AND job_id = ? AND lease_owner = ? AND state = ?",
                now + lease_ms,
                now,
                job.kind,
                job.job_id,
                owner,
                OPEN,
            )
        return changed > 0

    async def release_all(self, *, owner: str) -> int:
        """Give up every lease `owner` holds (at shutdown): those jobs are due again now."""
        async with self.db.transaction() as conn:
            return await conn.execute(
                "UPDATE aza_upstream_jobs SET lease_owner = NULL, lease_until = 0 "
                "WHERE lease_owner = ? AND state = ?",
                owner,
                OPEN,
            )

    async def wake(self, kind: str, job_id: str) -> None:
        """Make an open job due now (e.g. after a cancel was asked for)."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE aza_upstream_jobs SET next_poll_at = ? "
                "WHERE kind = ? AND job_id = ? AND state = ?",
                self.now_ms(),
                kind,
                job_id,
                OPEN,
            )

    async def state_of(self, kind: str, job_id: str) -> str | None:
        """`open`, `done`, or None for a job never queued."""
        async with self.db.read() as conn:
            value = await conn.fetchval(
                "SELECT state FROM aza_upstream_jobs WHERE kind = ? AND job_id = ?", kind, job_id
            )
        return None if value is None else str(value)

    async def open_count(self, kinds: Sequence[str] | None = None) -> int:
        async with self.db.read() as conn:
            if kinds:
                marks = ", ".join("?" * len(kinds))
                value = await conn.fetchval(
                    f"SELECT COUNT(*) FROM aza_upstream_jobs WHERE state = ? AND kind IN ({marks})",
                    OPEN,
                    *kinds,
                )
            else:
                value = await conn.fetchval(
                    "SELECT COUNT(*) FROM aza_upstream_jobs WHERE state = ?", OPEN
                )
        return int(value or 0)
