"""Per-key and per-device limits on the database: settings, cap holds and spend, rate windows.

Everything here is enforced by the database, so several instances share
one count: a cap is checked and its hold placed in one transaction locked
on the subject (`limit:<practice>:<scope>:<name>`); a rate window is
counted by one conditional upsert. Only requests of subjects with limits
come here; a key's limits arrive with the key itself (`KeyStore`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from budget.limits import Limits, Scope, Subject, Window, cap_admits
from credit.ports import Connection, Database, Row
from gateway.storage.renewal import RunningHolds

# A window's count is refused past this when only the other rate is limited.
_NO_LIMIT = 2**62


@dataclass(frozen=True, slots=True)
class CapHold:
    """A capped subject's estimate of one request in flight."""

    subject: Subject
    hold_id: str
    amount_micros: int
    period_start: int
    # The cap lease it is a share of (gateway.limit_leases), None for a hold of its own.
    lease: object | None = field(default=None, compare=False, repr=False)


def limits_of(row: Row | None, prefix: str = "") -> Limits | None:
    """The limits in a row's `<prefix>monthly_cap_micro_usd`… columns; None when it has none."""
    if row is None:
        return None
    cap = row[prefix + "monthly_cap_micro_usd"]
    rpm = row[prefix + "requests_per_minute"]
    tpm = row[prefix + "tokens_per_minute"]
    limits = Limits(
        monthly_cap_micros=None if cap is None else int(cap),
        requests_per_minute=None if rpm is None else int(rpm),
        tokens_per_minute=None if tpm is None else int(tpm),
    )
    return None if limits.empty else limits


def subject_lock(subject: Subject) -> str:
    return f"limit:{subject.practice_id}:{subject.scope}:{subject.name}"


class LimitStore:
    """The limit tables on one `Database`, with a short cache of device limits."""

    def __init__(
        self,
        db: Database,
        *,
        hold_ttl_seconds: int = 900,
        cache_seconds: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.hold_ttl_seconds = hold_ttl_seconds
        self.cache_seconds = cache_seconds
        self._clock = clock
        # Cap holds of requests still running, renewed like their budget holds.
        self.running = RunningHolds(
            db, hold_ttl_seconds=hold_ttl_seconds, clock=clock, table="ai_limit_holds"
        )
        self._devices: dict[tuple[str, str], tuple[float, Limits | None]] = {}

    # -- settings -----------------------------------------------------------

    async def get(self, practice_id: str, scope: Scope, name: str) -> Limits:
        async with self.db.read() as conn:
            row = await conn.fetchone(
                "SELECT monthly_cap_micro_usd, requests_per_minute, tokens_per_minute "
                "FROM ai_spend_limits WHERE practice_id = ? AND scope = ? AND subject = ?",
                practice_id,
                str(scope),
                name,
            )
        return limits_of(row) or Limits()

    async def put(self, practice_id: str, scope: Scope, name: str, limits: Limits) -> None:
        """Set (or, when `limits` is empty, remove) the limits of a key or device."""
        async with self.db.transaction(lock=practice_id) as conn:
            if limits.empty:
                await conn.execute(
                    "DELETE FROM ai_spend_limits WHERE practice_id = ? AND scope = ? "
                    "AND subject = ?",
                    practice_id,
                    str(scope),
                    name,
                )
            else:
                await conn.execute(
                    "INSERT INTO ai_spend_limits (practice_id, scope, subject, "
                    "monthly_cap_micro_usd, requests_per_minute, tokens_per_minute, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (practice_id, scope, subject) "
                    "DO UPDATE SET monthly_cap_micro_usd = excluded.monthly_cap_micro_usd, "
                    "requests_per_minute = excluded.requests_per_minute, "
                    "tokens_per_minute = excluded.tokens_per_minute, "
                    "updated_at = excluded.updated_at",
                    practice_id,
                    str(scope),
                    name,
                    limits.monthly_cap_micros,
                    limits.requests_per_minute,
                    limits.tokens_per_minute,
                    int(self._clock()),
                )
        self._devices.clear()

    async def device_limits(self, practice_id: str, device_id: str) -> Limits | None:
        """A device's limits (cached for `cache_seconds`, like key lookups)."""
        now = self._clock()
        cached = self._devices.get((practice_id, device_id))
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self.db.read() as conn:
            row = await conn.fetchone(
                "SELECT monthly_cap_micro_usd, requests_per_minute, tokens_per_minute "
                "FROM ai_spend_limits WHERE practice_id = ? AND scope = 'device' AND subject = ?",
                practice_id,
                device_id,
            )
        limits = limits_of(row)
        if len(self._devices) > 10_000:
            self._devices.clear()
        self._devices[(practice_id, device_id)] = (now + self.cache_seconds, limits)
        return limits

    async def of_practice(self, practice_id: str) -> dict[tuple[Scope, str], Limits]:
        """Every key's and device's limits of a practice (the console lists them)."""
        async with self.db.read() as conn:
            rows = await conn.fetchall(
                "SELECT scope, subject, monthly_cap_micro_usd, requests_per_minute, "
                "tokens_per_minute FROM ai_spend_limits WHERE practice_id = ? "
                "ORDER BY scope, subject",
                practice_id,
            )
        found = {}
        for row in rows:
            limits = limits_of(row)
            if limits is not None:
                found[(Scope(row["scope"]), str(row["subject"]))] = limits
        return found

    async def spend_of_practice(
        self, practice_id: str, period_start: int
    ) -> dict[tuple[Scope, str], int]:
        """What each key and device of a practice spent in the period, in micro-USD."""
        async with self.db.read() as conn:
            rows = await conn.fetchall(
                "SELECT scope, subject, used_micro_usd FROM ai_limit_totals "
                "WHERE practice_id = ? AND period_start = ?",
                practice_id,
                period_start,
            )
        return {
            (Scope(row["scope"]), str(row["subject"])): int(row["used_micro_usd"]) for row in rows
        }

    async def used_micros(self, subject: Subject, period_start: int) -> int:
        async with self.db.read() as conn:
            value = await conn.fetchval(
                "SELECT used_micro_usd FROM ai_limit_totals WHERE practice_id = ? AND scope = ? "
                "AND subject = ? AND period_start = ?",
                subject.practice_id,
                str(subject.scope),
                subject.name,
                period_start,
            )
        return int(value or 0)

    # -- rate windows -------------------------------------------------------

    async def take_rate(
        self, subject: Subject, *, tokens: int, window: Window, requests: int = 1
    ) -> bool:
        """Count `requests` requests of `tokens` in all in `window` if both limits leave
        room; atomically.

        The first request of a window is always counted (a request larger
        than tokens_per_minute could otherwise never run).
        """
        limits = subject.limits
        rpm = limits.requests_per_minute
        tpm = limits.tokens_per_minute
        async with self.db.transaction() as conn:
            row = await conn.fetchone(
                "INSERT INTO ai_rate_windows AS w (practice_id, scope, subject, window_start, "
                "requests, tokens) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (practice_id, scope, subject, window_start) DO UPDATE SET "
                "requests = w.requests + excluded.requests, tokens = w.tokens + excluded.tokens "
                "WHERE w.requests + excluded.requests <= ? AND w.tokens + excluded.tokens <= ? "
                "RETURNING requests",
                subject.practice_id,
                str(subject.scope),
                subject.name,
                window.start_ms,
                requests,
                tokens,
                _NO_LIMIT if rpm is None else rpm,
                _NO_LIMIT if tpm is None else tpm,
            )
        return row is not None

    # -- caps ---------------------------------------------------------------

    async def hold_cap(
        self,
        subject: Subject,
        *,
        hold_id: str,
        estimate_micros: int,
        period_start: int,
        require_micros: int | None = None,
    ) -> CapHold | None:
        """Place `estimate_micros` against the subject's cap, or None when it does not fit
        (or, with `require_micros`, when less than that is left)."""
        cap = subject.limits.monthly_cap_micros
        assert cap is not None
        now = int(self._clock())
        amount = max(1, estimate_micros)
        key: tuple[Any, ...] = (subject.practice_id, str(subject.scope), subject.name)
        async with self.db.transaction(lock=subject_lock(subject)) as conn:
            row = await conn.fetchone(
                "SELECT (SELECT COALESCE(SUM(used_micro_usd), 0) FROM ai_limit_totals "
                "WHERE practice_id = ? AND scope = ? AND subject = ? AND period_start = ?) "
                "AS used, "
                "(SELECT COALESCE(SUM(amount_micro_usd), 0) FROM ai_limit_holds "
                "WHERE practice_id = ? AND scope = ? AND subject = ? AND expires_at > ?) AS held",
                *key,
                period_start,
                *key,
                now,
            )
            assert row is not None  # aggregates: one row
            if not cap_admits(
                used_micros=int(row["used"]),
                held_micros=int(row["held"]),
                estimate_micros=max(amount, require_micros or 0),
                cap_micros=cap,
            ):
                return None
            await conn.execute(
                "INSERT INTO ai_limit_holds (practice_id, scope, subject, hold_id, "
                "amount_micro_usd, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                *key,
                hold_id,
                amount,
                now + self.hold_ttl_seconds,
            )
        return CapHold(subject, hold_id, amount, period_start)

    async def settle_cap(self, hold: CapHold, cost_micros: int) -> None:
        """Replace the hold with what the request cost, in one transaction (idempotent)."""
        subject = hold.subject
        key = (subject.practice_id, str(subject.scope), subject.name)
        async with self.db.transaction(lock=subject_lock(subject)) as conn:
            deleted = await conn.execute(
                "DELETE FROM ai_limit_holds WHERE practice_id = ? AND scope = ? AND subject = ? "
                "AND hold_id = ?",
                *key,
                hold.hold_id,
            )
            # Once per hold: a retry after a commit whose answer was lost adds nothing.
            if deleted and cost_micros > 0:
                await conn.execute(
                    "INSERT INTO ai_limit_totals AS t (practice_id, scope, subject, period_start, "
                    "used_micro_usd) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (practice_id, scope, subject, period_start) DO UPDATE SET "
                    "used_micro_usd = t.used_micro_usd + excluded.used_micro_usd",
                    *key,
                    hold.period_start,
                    cost_micros,
                )

    async def release_cap(self, hold: CapHold) -> None:
        """Drop the hold without charging (the request was not forwarded or failed)."""
        subject = hold.subject
        async with self.db.transaction(lock=subject_lock(subject)) as conn:
            await conn.execute(
                "DELETE FROM ai_limit_holds WHERE practice_id = ? AND scope = ? AND subject = ? "
                "AND hold_id = ?",
                subject.practice_id,
                str(subject.scope),
                subject.name,
                hold.hold_id,
            )

    # -- background responses -------------------------------------------------

    @staticmethod
    async def hold_durable(
        conn: Connection, caps: Sequence[CapHold], hold_id: str, expires_at: int
    ) -> None:
        """A durable hold `hold_id` of each cap's amount, in the caller's transaction.

        A background response runs on after its request ended: like its
        budget hold, its cap holds become rows that outlive the request (and
        the instance), settled with the response (`settle_durable`). The
        caller then releases `caps`.
        """
        for cap in caps:
            subject = cap.subject
            await conn.execute(
                "INSERT INTO ai_limit_holds (practice_id, scope, subject, hold_id, "
                "amount_micro_usd, expires_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (practice_id, scope, subject, hold_id) DO NOTHING",
                subject.practice_id,
                str(subject.scope),
                subject.name,
                hold_id,
                cap.amount_micros,
                expires_at,
            )

    @staticmethod
    async def settle_durable(
        conn: Connection, practice_id: str, hold_id: str, cost_micros: int, period_start: int
    ) -> int:
        """Replace every durable hold `hold_id` of the practice with `cost_micros` added to
        its subject's spend in `period_start`, in the caller's transaction (which makes
        it once: a hold already gone adds nothing). The number of subjects settled."""
        rows = await conn.fetchall(
            "DELETE FROM ai_limit_holds WHERE practice_id = ? AND hold_id = ? "
            "RETURNING scope, subject",
            practice_id,
            hold_id,
        )
        if cost_micros > 0:
            for row in rows:
                await conn.execute(
                    "INSERT INTO ai_limit_totals AS t (practice_id, scope, subject, period_start, "
                    "used_micro_usd) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (practice_id, scope, subject, period_start) DO UPDATE SET "
                    "used_micro_usd = t.used_micro_usd + excluded.used_micro_usd",
                    practice_id,
                    row["scope"],
                    row["subject"],
                    period_start,
                    cost_micros,
                )
        return len(rows)

    async def sweep(self, *, window_ms: int) -> int:
        """Delete expired cap holds and rate windows older than two windows."""
        now = self._clock()
        async with self.db.transaction() as conn:
            holds = await conn.execute("DELETE FROM ai_limit_holds WHERE expires_at <= ?", int(now))
            windows = await conn.execute(
                "DELETE FROM ai_rate_windows WHERE window_start < ?",
                int(now * 1000) - 2 * window_ms,
            )
        return holds + windows
