"""Files, uploads and batches as the gateway keeps them (migrations 010 and 016).

`aza_upstream_objects` records which practice owns each upstream file,
upload and batch id (a practice sees only its own); `aza_batches` holds a
batch's hold, cap hold, estimate and, once it ended, what it was charged.
A batch is first recorded under its intent id (status `creating`, batch_id
= intent_id) and named when the upstream's answer gives its id
(`name_intent`), or forgotten with its holds when none was made
(`abandon_intent`). Settling a batch writes one usage event per completed
line (request id `batch:<batch_id>:<custom_id>`, created at the batch's
`settled_at`, which the usage views join on; unique, so a repeated settle
charges nothing twice), deletes the hold, settles the cap holds and marks
the batch settled, in one transaction locked on the practice. Amounts are
integer micro-USD.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from budget.license import Period
from budget.usage import Usage
from credit.ports import Connection, Database, Row
from gateway.storage.budget_state import StateReader
from gateway.storage.limits import LimitStore
from gateway.storage.settle import write_usage

# (transaction, practice, period start, budget micro-USD): the period's alert marks.
MarksWriter = Callable[[Connection, str, int, int], Awaitable[None]]

FILE = "file"
UPLOAD = "upload"
BATCH = "batch"
# The status of a batch recorded before the upstream named it (its batch_id is its intent_id).
CREATING = "creating"


def line_request_id(batch_id: str, custom_id: str) -> str:
    """The derived request id of one batch line's usage event (unique per line)."""
    return f"batch:{batch_id}:{custom_id}"


@dataclass(frozen=True, slots=True)
class BatchRow:
    """A batch the gateway follows: who owns it, its hold and estimate, what it was charged."""

    batch_id: str
    practice_id: str
    hold_id: str
    endpoint: str
    model: str
    input_file_id: str
    lines: int
    estimate_micros: int
    status: str
    completed_lines: int
    failed_lines: int
    cost_micros: int
    created_at: int
    settled_at: int | None
    # The X-Device-Id that created it (its lines' usage events carry it).
    device_id: str | None = None
    # Before the upstream named it: the id sent in its metadata (`aza_intent`).
    intent_id: str | None = None
    # Its hold on the creating key's and device's monthly caps, and which were capped.
    cap_hold_id: str | None = None
    cap_key: str | None = None
    cap_device: str | None = None


def _batch(row: Row) -> BatchRow:
    return BatchRow(
        batch_id=row["batch_id"],
        practice_id=row["practice_id"],
        hold_id=row["hold_id"],
        endpoint=row["endpoint"],
        model=row["model"],
        input_file_id=row["input_file_id"],
        lines=int(row["lines"]),
        estimate_micros=int(row["estimate_micro_usd"]),
        status=row["status"],
        completed_lines=int(row["completed_lines"]),
        failed_lines=int(row["failed_lines"]),
        cost_micros=int(row["cost_micro_usd"]),
        created_at=int(row["created_at"]),
        settled_at=None if row["settled_at"] is None else int(row["settled_at"]),
        device_id=row["device_id"],
        intent_id=row["intent_id"],
        cap_hold_id=row["cap_hold_id"],
        cap_key=row["cap_key"],
        cap_device=row["cap_device"],
    )


@dataclass(frozen=True, slots=True)
class ChargedLine:
    """One completed line to charge: its custom_id, usage and cost (micro-USD)."""

    custom_id: str
    usage: Usage
    cost_micros: int


class BatchStore:
    """Ownership of upstream objects and the batches' metering, on one `Database`."""

    def __init__(
        self,
        db: Database,
        *,
        states: StateReader,
        clock: Callable[[], float] = time.time,
        marks: MarksWriter | None = None,
    ) -> None:
        self.db = db
        self.states = states
        self._clock = clock
        # Writes the period's alert marks in the settle's transaction when they are missing
        # (gateway.alerts.store.AlertStore.ensure_marks_in): a batch may settle in a period
        # no gate has seen yet, and its usage must still cross the period's thresholds.
        self.marks = marks

    def now(self) -> int:
        return int(self._clock())

    # -- ownership ----------------------------------------------------------

    async def record(
        self, object_id: str, object_type: str, practice_id: str, *, conn: Connection | None = None
    ) -> None:
        """Record that `practice_id` owns `object_id` (the first owner stays the owner)."""
        sql = (
            "INSERT INTO aza_upstream_objects (object_id, object_type, practice_id, created_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (object_id) DO NOTHING"
        )
        args = (object_id, object_type, practice_id, self.now())
        if conn is not None:
            await conn.execute(sql, *args)
            return
        async with self.db.transaction() as tx:
            await tx.execute(sql, *args)

    async def owns(self, practice_id: str, object_type: str, object_id: str) -> bool:
        """True when `practice_id` owns the (not deleted) object."""
        async with self.db.read() as conn:
            value = await conn.fetchval(
                "SELECT 1 FROM aza_upstream_objects WHERE object_id = ? AND object_type = ? "
                "AND practice_id = ? AND deleted_at IS NULL",
                object_id,
                object_type,
                practice_id,
            )
        return value is not None

    async def owned(self, practice_id: str, object_type: str, ids: Iterable[str]) -> set[str]:
        """Those of `ids` that `practice_id` owns."""
        wanted = sorted(set(ids))
        if not wanted:
            return set()
        found: set[str] = set()
        async with self.db.read() as conn:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                rows = await conn.fetchall(
                    f"SELECT object_id FROM aza_upstream_objects WHERE practice_id = ? "
                    f"AND object_type = ? AND deleted_at IS NULL AND object_id IN ({marks})",
                    practice_id,
                    object_type,
                    *chunk,
                )
                found.update(str(row["object_id"]) for row in rows)
        return found

    async def mark_deleted(self, object_id: str) -> None:
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE aza_upstream_objects SET deleted_at = ? WHERE object_id = ?",
                self.now(),
                object_id,
            )

    # -- batches ------------------------------------------------------------

    async def insert_batch(self, conn: Connection, batch: BatchRow) -> None:
        """Record a batch just created upstream (inside the caller's transaction)."""
        await conn.execute(
            "INSERT INTO aza_batches (batch_id, practice_id, hold_id, endpoint, model, "
            "input_file_id, lines, estimate_micro_usd, status, created_at, device_id, "
            "intent_id, cap_hold_id, cap_key, cap_device) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            batch.batch_id,
            batch.practice_id,
            batch.hold_id,
            batch.endpoint,
            batch.model,
            batch.input_file_id,
            batch.lines,
            batch.estimate_micros,
            batch.status,
            batch.created_at,
            batch.device_id,
            batch.intent_id,
            batch.cap_hold_id,
            batch.cap_key,
            batch.cap_device,
        )

    async def batch(self, batch_id: str) -> BatchRow | None:
        async with self.db.read() as conn:
            row = await conn.fetchone("SELECT * FROM aza_batches WHERE batch_id = ?", batch_id)
        return None if row is None else _batch(row)

    async def intent(self, intent_id: str) -> BatchRow | None:
        """The batch recorded under `intent_id`, named by the upstream or not."""
        async with self.db.read() as conn:
            row = await conn.fetchone("SELECT * FROM aza_batches WHERE intent_id = ?", intent_id)
        return None if row is None else _batch(row)

    async def name_intent(
        self, conn: Connection, intent_id: str, batch_id: str, status: str
    ) -> bool | None:
        """Give the batch recorded under `intent_id` the id the upstream gave it (inside the
        caller's transaction, locked on the practice). True when named now, False when it
        was named so before, None when the intent is gone (abandoned) or named otherwise."""
        changed = await conn.execute(
            "UPDATE aza_batches SET batch_id = ?, status = ? "
            "WHERE intent_id = ? AND batch_id = intent_id",
            batch_id,
            status,
            intent_id,
        )
        if changed:
            return True
        named = await conn.fetchval(
            "SELECT 1 FROM aza_batches WHERE intent_id = ? AND batch_id = ?", intent_id, batch_id
        )
        return False if named is not None else None

    async def abandon_intent(self, conn: Connection, intent_id: str) -> bool:
        """Forget a batch the upstream never made (inside the caller's transaction, locked
        on the practice): its row, its budget hold and its cap holds go. False when the
        upstream had named it meanwhile (then it is followed, and nothing changes)."""
        row = await conn.fetchone(
            "SELECT practice_id, hold_id, cap_hold_id FROM aza_batches "
            "WHERE intent_id = ? AND batch_id = intent_id",
            intent_id,
        )
        if row is None:
            return False
        practice_id = row["practice_id"]
        await conn.execute("DELETE FROM aza_batches WHERE batch_id = ?", intent_id)
        await conn.execute(
            "DELETE FROM ai_budget_holds WHERE practice_id = ? AND hold_id = ?",
            practice_id,
            row["hold_id"],
        )
        if row["cap_hold_id"] is not None:
            await LimitStore.settle_durable(conn, practice_id, row["cap_hold_id"], 0, 0)
        return True

    @staticmethod
    async def keep_hold(conn: Connection, practice_id: str, hold_id: str, until: int) -> None:
        """Keep a batch's budget hold until `until` at least (in the caller's transaction)."""
        await conn.execute(
            "UPDATE ai_budget_holds SET expires_at = ? "
            "WHERE practice_id = ? AND hold_id = ? AND expires_at < ?",
            until,
            practice_id,
            hold_id,
            until,
        )

    async def follow_status(self, batch_id: str, status: str, *, hold_until: int) -> None:
        """Note the upstream status of a running batch and keep its holds (the budget's and
        the caps') alive until `hold_until` (a batch may run for a day; its holds must
        outlive every poll)."""
        async with self.db.transaction() as conn:
            row = await conn.fetchone(
                "SELECT practice_id, hold_id, cap_hold_id FROM aza_batches WHERE batch_id = ?",
                batch_id,
            )
            if row is None:
                return
            if row["cap_hold_id"] is not None:
                await conn.execute(
                    "UPDATE ai_limit_holds SET expires_at = ? "
                    "WHERE practice_id = ? AND hold_id = ? AND expires_at < ?",
                    hold_until,
                    row["practice_id"],
                    row["cap_hold_id"],
                    hold_until,
                )
            await conn.execute(
                "UPDATE aza_batches SET status = ? WHERE batch_id = ? AND settled_at IS NULL",
                status,
                batch_id,
            )
            await self.keep_hold(conn, row["practice_id"], row["hold_id"], hold_until)

    async def settle(
        self,
        batch: BatchRow,
        *,
        status: str,
        charged: Sequence[ChargedLine],
        failed_lines: int,
    ) -> int:
        """Charge the completed lines, release the hold and mark the batch settled; atomically.

        Returns the micro-USD charged now (0 when it had been settled before).
        Each line's usage event is unique on its derived request id, so a
        settle repeated after a crash charges nothing twice.
        """
        now = self.now()
        async with self.db.transaction(lock=batch.practice_id) as conn:
            settled = await conn.fetchval(
                "SELECT settled_at FROM aza_batches WHERE batch_id = ?", batch.batch_id
            )
            if settled is not None:
                return 0
            state = await self.states.read(conn, batch.practice_id, now)
            lic = state.license
            if lic is None:
                raise LookupError(f"practice {batch.practice_id} has no license to charge")
            period = state.period or Period(lic.period_start, lic.period_end)
            used = int(
                await conn.fetchval(
                    "SELECT COALESCE(SUM(used_micro_usd), 0) FROM ai_usage_period_totals "
                    "WHERE practice_id = ? AND period_start = ?",
                    batch.practice_id,
                    period.start,
                )
            )
            if self.marks is not None and charged:
                await self.marks(
                    conn, batch.practice_id, period.start, state.snapshot.budget_micros
                )
            total = 0
            for line in charged:
                event_id, _, _ = await write_usage(
                    conn,
                    lic=lic,
                    period=period,
                    budget_micros=state.snapshot.budget_micros,
                    usage=line.usage,
                    cost_micros=line.cost_micros,
                    request_id=line_request_id(batch.batch_id, line.custom_id),
                    device_id=batch.device_id,
                    status="success",
                    started_at=batch.created_at,
                    now=now,
                    hold_micros=None,
                    used_micros=used,
                )
                if event_id is not None:
                    used += line.cost_micros
                    total += line.cost_micros
            await conn.execute(
                "DELETE FROM ai_budget_holds WHERE practice_id = ? AND hold_id = ?",
                batch.practice_id,
                batch.hold_id,
            )
            if batch.cap_hold_id is not None:
                # The key's and device's caps: their hold replaced by what the lines cost.
                await LimitStore.settle_durable(
                    conn, batch.practice_id, batch.cap_hold_id, total, period.start
                )
            await conn.execute(
                "UPDATE aza_batches SET status = ?, completed_lines = ?, failed_lines = ?, "
                "cost_micro_usd = cost_micro_usd + ?, settled_at = ? WHERE batch_id = ?",
                status,
                len(charged),
                failed_lines,
                total,
                now,
                batch.batch_id,
            )
        return total
