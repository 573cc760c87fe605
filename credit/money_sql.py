"""The money SQL, written once: what a practice has, summed from the tables.

Four sums make a practice's money (micro-USD): this period's usage, the
extra credit bought (succeeded ledger entries), the extra credit used by
usage, and what holds in flight reserve. The extra credit left is the
second minus the third (negative after a refund of credit already used).

This module is the one place they are written for the engine-neutral code,
which runs them on both engines: the gate's state read
(`gateway/storage/budget_state.py`), the ledger's balance
(`credit/ledger.py`) and SQLite's credit alert trigger (migration 014, which
takes `extra_credit_sql` by name, `gateway/storage/__init__.py`). What runs
inside PostgreSQL (the gate and settle functions, the alert trigger) reads
them from the function `aza_money` (`gateway/storage/functions/aza_money.sql`)
instead; `tests/storage/test_one_call_gate.py` holds the two equal on random
rows.

Each builder takes the SQL of its arguments: `?` placeholders by default,
or a trigger's `NEW.practice_id`.
"""

from __future__ import annotations


def period_used_sql(practice: str = "?", period_start: str = "?") -> str:
    """The practice's usage in one budget period."""
    return (
        "SELECT COALESCE(SUM(used_micro_usd), 0) FROM ai_usage_period_totals "
        f"WHERE practice_id = {practice} AND period_start = {period_start}"
    )


def credited_sql(practice: str = "?") -> str:
    """The extra credit the practice bought: its succeeded ledger entries (refunds negative)."""
    return (
        "SELECT COALESCE(SUM(amount_internal_micro_usd), 0) FROM ai_credit_ledger "
        f"WHERE practice_id = {practice} AND status = 'succeeded'"
    )


def credit_used_sql(practice: str = "?") -> str:
    """The extra credit the practice's usage took, over all periods."""
    return (
        "SELECT COALESCE(SUM(used_credit_micro_usd), 0) FROM ai_usage_period_totals "
        f"WHERE practice_id = {practice}"
    )


def held_sql(practice: str = "?", now: str = "?") -> str:
    """What the practice's holds in flight (not expired at `now`) reserve."""
    return (
        "SELECT COALESCE(SUM(amount_micro_usd), 0) FROM ai_budget_holds "
        f"WHERE practice_id = {practice} AND expires_at > {now}"
    )


def extra_credit_sql(practice: str = "?") -> str:
    """The extra credit left, as one expression (`practice` appears twice)."""
    return f"(({credited_sql(practice)}) - ({credit_used_sql(practice)}))"


# The four sums as columns used, credited, credit_used, held (the gate's and
# the settle's read). Arguments: practice, period start, practice, practice,
# practice, now.
MONEY_COLUMNS = f"""
  ({period_used_sql()}) AS used,
  ({credited_sql()}) AS credited,
  ({credit_used_sql()}) AS credit_used,
  ({held_sql()}) AS held
"""
# The period's usage alone (arguments: practice, period start).
PERIOD_USED_SQL = period_used_sql()
# The extra credit left (arguments: practice, practice).
EXTRA_CREDIT_SQL = f"SELECT {extra_credit_sql()}"
