"""Alert settings, budget marks and the outbox on the gateway's database.

The triggers of migration 012 write outbox rows; this store reads and
changes settings, writes the marks those triggers compare usage with, and
lets delivery workers claim due rows (one instance at a time per row: a
claim is a time-limited mark set by one conditional UPDATE).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from credit.ports import Connection, Database, Row
from gateway.alerts.events import BANNER_TYPES, Alert, AlertType
from gateway.alerts.messages import AlertLanguage, language_of

DEFAULT_BUDGET_PERCENTS: tuple[int, ...] = (50, 80, 95, 100)
DEFAULT_KEY_CAP_PERCENT = 80

_OUTBOX_COLUMNS = (
    "id, practice_id, alert_type, period_start, threshold, amount_micro_usd, limit_micro_usd, "
    "paid_rappen, subject, reason, created_at, email_state, webhook_state, attempts"
)


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """A practice's alert settings (the defaults when it has none)."""

    budget_used_percent: tuple[int, ...] = DEFAULT_BUDGET_PERCENTS
    extra_credit_below_micros: int | None = None
    key_cap_percent: int = DEFAULT_KEY_CAP_PERCENT
    email: str | None = None
    webhook_url: str | None = None
    language: AlertLanguage = "de"
    webhook_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Claimed:
    """An outbox row a worker claimed: the alert and where its channels stand."""

    alert: Alert
    email_state: str
    webhook_state: str
    attempts: int


def mark_micros(budget_micros: int, percent: int) -> int:
    """The usage (micro-USD) at which `percent` of `budget_micros` is used (rounded up)."""
    return -(-budget_micros * percent // 100)


def _alert(row: Row) -> Alert:
    return Alert(
        id=row["id"],
        practice_id=row["practice_id"],
        type=AlertType(row["alert_type"]),
        created=int(row["created_at"]),
        period_start=None if row["period_start"] is None else int(row["period_start"]),
        threshold=None if row["threshold"] is None else int(row["threshold"]),
        amount_micros=None if row["amount_micro_usd"] is None else int(row["amount_micro_usd"]),
        limit_micros=None if row["limit_micro_usd"] is None else int(row["limit_micro_usd"]),
        paid_rappen=None if row["paid_rappen"] is None else int(row["paid_rappen"]),
        subject=row["subject"],
        reason=row["reason"],
    )


class AlertStore:
    """Settings, marks and outbox of every practice on one `Database`."""

    def __init__(
        self,
        db: Database,
        *,
        default_language: AlertLanguage = "de",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.default_language = default_language
        self._clock = clock
        # (practice, period start, budget) whose marks this process wrote or found.
        self._marked: set[tuple[str, int, int]] = set()
        self._languages: dict[str, tuple[float, AlertLanguage]] = {}

    # -- settings ---------------------------------------------------------

    def _settings(self, row: Row | None) -> AlertSettings:
        if row is None:
            return AlertSettings(language=self.default_language)
        below = row["extra_credit_below_micro_usd"]
        return AlertSettings(
            budget_used_percent=tuple(int(p) for p in json.loads(row["budget_used_percent"])),
            extra_credit_below_micros=None if below is None else int(below),
            key_cap_percent=int(row["key_cap_percent"]),
            email=row["email"],
            webhook_url=row["webhook_url"],
            language=language_of(row["language"], self.default_language),
            webhook_secret=row["webhook_secret"],
        )

    async def settings(self, practice_id: str, conn: Connection | None = None) -> AlertSettings:
        sql = "SELECT * FROM ai_alert_settings WHERE practice_id = ?"
        if conn is not None:
            return self._settings(await conn.fetchone(sql, practice_id))
        async with self.db.read() as read:
            return self._settings(await read.fetchone(sql, practice_id))

    async def save_settings(
        self,
        practice_id: str,
        settings: AlertSettings,
        *,
        period: tuple[int, int] | None,
    ) -> None:
        """Write `settings`, and the marks of the current `period` (start, budget micro-USD)."""
        now = int(self._clock())
        async with self.db.transaction(lock=practice_id) as conn:
            await conn.execute(
                "INSERT INTO ai_alert_settings (practice_id, budget_used_percent, "
                "extra_credit_below_micro_usd, key_cap_percent, email, webhook_url, "
                "webhook_secret, language, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (practice_id) DO UPDATE SET "
                "budget_used_percent = excluded.budget_used_percent, "
                "extra_credit_below_micro_usd = excluded.extra_credit_below_micro_usd, "
                "key_cap_percent = excluded.key_cap_percent, email = excluded.email, "
                "webhook_url = excluded.webhook_url, webhook_secret = excluded.webhook_secret, "
                "language = excluded.language, updated_at = excluded.updated_at",
                practice_id,
                json.dumps(list(settings.budget_used_percent)),
                settings.extra_credit_below_micros,
                settings.key_cap_percent,
                settings.email,
                settings.webhook_url,
                settings.webhook_secret,
                settings.language,
                now,
            )
            if period is not None:
                start, budget = period
                await conn.execute(
                    "DELETE FROM ai_alert_marks WHERE practice_id = ? AND period_start >= ?",
                    practice_id,
                    start,
                )
                await self._write_marks(conn, practice_id, start, budget, settings)
        self._marked = {m for m in self._marked if m[0] != practice_id}
        self._languages.pop(practice_id, None)

    async def language(self, practice_id: str) -> AlertLanguage:
        """The practice's language (its alert settings'), cached for a minute."""
        now = self._clock()
        cached = self._languages.get(practice_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        language = (await self.settings(practice_id)).language
        if len(self._languages) > 10_000:
            self._languages.clear()
        self._languages[practice_id] = (now + 60.0, language)
        return language

    # -- marks ------------------------------------------------------------

    async def _write_marks(
        self,
        conn: Connection,
        practice_id: str,
        period_start: int,
        budget_micros: int,
        settings: AlertSettings,
    ) -> None:
        if budget_micros <= 0:
            return
        for percent in settings.budget_used_percent:
            await conn.execute(
                "INSERT INTO ai_alert_marks (practice_id, period_start, percent, mark_micro_usd, "
                "budget_micro_usd) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (practice_id, period_start, percent) DO UPDATE SET "
                "mark_micro_usd = excluded.mark_micro_usd, "
                "budget_micro_usd = excluded.budget_micro_usd",
                practice_id,
                period_start,
                percent,
                mark_micros(budget_micros, percent),
                budget_micros,
            )

    def marked(self, practice_id: str, period_start: int, budget_micros: int) -> bool:
        """True when this process already wrote (or found) the marks of this period."""
        return (practice_id, period_start, budget_micros) in self._marked

    async def ensure_marks(self, practice_id: str, period_start: int, budget_micros: int) -> None:
        """Make sure the period's marks exist (once per practice, period and budget here).

        The triggers compare the period's usage with these marks; a period's
        marks are written by the first gate of the period (`gateway.middleware.gate`),
        or by a settle outside the gate (`ensure_marks_in`), whichever comes first.
        """
        key = (practice_id, period_start, budget_micros)
        if key in self._marked:
            return
        async with self.db.transaction(lock=practice_id) as conn:
            await self._marks_present(conn, practice_id, period_start, budget_micros)
        if len(self._marked) > 100_000:
            self._marked.clear()
        self._marked.add(key)

    async def ensure_marks_in(
        self, conn: Connection, practice_id: str, period_start: int, budget_micros: int
    ) -> None:
        """`ensure_marks` inside the caller's transaction (locked on the practice), before
        it writes usage that no gate of this period preceded: a batch or a background
        response settling in a later period than it was admitted in, say. The marks
        then exist when the usage's trigger compares, in the same transaction."""
        if (practice_id, period_start, budget_micros) in self._marked:
            return
        # Not remembered here: the caller's transaction may still roll back.
        await self._marks_present(conn, practice_id, period_start, budget_micros)

    async def _marks_present(
        self, conn: Connection, practice_id: str, period_start: int, budget_micros: int
    ) -> None:
        present = await conn.fetchval(
            "SELECT COUNT(*) FROM ai_alert_marks WHERE practice_id = ? AND period_start = ? "
            "AND budget_micro_usd = ?",
            practice_id,
            period_start,
            budget_micros,
        )
        settings = await self.settings(practice_id, conn)
        if int(present or 0) != len(settings.budget_used_percent):
            await conn.execute(
                "DELETE FROM ai_alert_marks WHERE practice_id = ? AND period_start = ?",
                practice_id,
                period_start,
            )
            await self._write_marks(conn, practice_id, period_start, budget_micros, settings)

    # -- the outbox -------------------------------------------------------

    async def pending(self, practice_id: str, period_start: int | None) -> list[dict[str, Any]]:
        """This period's alerts a client app may show as a banner, oldest first."""
        placeholders = ", ".join("?" * len(BANNER_TYPES))
        async with self.db.read() as conn:
            rows = await conn.fetchall(
                f"SELECT {_OUTBOX_COLUMNS} FROM ai_alert_outbox WHERE practice_id = ? "
                f"AND alert_type IN ({placeholders}) AND (period_start IS NULL "
                "OR period_start = ?) AND created_at >= ? ORDER BY created_at, threshold, id",
                practice_id,
                *(str(t) for t in BANNER_TYPES),
                -1 if period_start is None else period_start,
                -1 if period_start is None else period_start,
            )
        return [
            {"id": a.id, "type": str(a.type), "created": a.created, "data": a.data()}
            for a in map(_alert, rows)
        ]

    async def alerts(self, practice_id: str) -> Sequence[Row]:
        """Every outbox row of a practice (tests, operators)."""
        async with self.db.read() as conn:
            return await conn.fetchall(
                "SELECT * FROM ai_alert_outbox WHERE practice_id = ? ORDER BY created_at, id",
                practice_id,
            )

    async def claim_due(self, *, now_ms: int, claim_ms: int, limit: int = 20) -> list[Claimed]:
        """Claim up to `limit` due rows for `claim_ms`; another worker skips them meanwhile."""
        async with self.db.transaction() as conn:
            rows = await conn.fetchall(
                "UPDATE ai_alert_outbox SET claimed_until_ms = ? WHERE id IN ("
                "SELECT id FROM ai_alert_outbox WHERE done_at IS NULL AND next_attempt_ms <= ? "
                "AND claimed_until_ms <= ? ORDER BY next_attempt_ms LIMIT ?) "
                "AND done_at IS NULL AND claimed_until_ms <= ? "
                f"RETURNING {_OUTBOX_COLUMNS}",
                now_ms + claim_ms,
                now_ms,
                now_ms,
                limit,
                now_ms,
            )
        return [
            Claimed(
                alert=_alert(row),
                email_state=row["email_state"],
                webhook_state=row["webhook_state"],
                attempts=int(row["attempts"]),
            )
            for row in rows
        ]

    async def record_attempt(
        self,
        alert_id: str,
        *,
        email_state: str,
        webhook_state: str,
        attempts: int,
        next_attempt_ms: int,
        done: bool,
        last_error: str | None,
    ) -> None:
        """Write where an alert's channels stand after an attempt, and release its claim."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE ai_alert_outbox SET email_state = ?, webhook_state = ?, attempts = ?, "
                "next_attempt_ms = ?, claimed_until_ms = 0, last_error = ?, done_at = ? "
                "WHERE id = ?",
                email_state,
                webhook_state,
                attempts,
                next_attempt_ms,
                last_error,
                int(self._clock()) if done else None,
                alert_id,
            )
