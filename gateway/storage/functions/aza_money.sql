-- One PostgreSQL function, defined here only; migrations apply it with
-- CREATE OR REPLACE (`\ir ../../functions/<name>.sql`, gateway/storage/__init__.py).
--
-- A practice's money at one moment: this period's usage, extra credit bought
-- and used, holds in flight (the gate's and the settle's read; micro-USD).
-- The money SQL of everything that runs inside PostgreSQL (aza_reserve,
-- aza_settle, the alert trigger aza_alert_usage); the engine-neutral code
-- runs the same sums from credit/money_sql.py, and
-- tests/storage/test_one_call_gate.py holds the two equal on random rows.

CREATE OR REPLACE FUNCTION aza_money(p_practice_id TEXT, p_period_start BIGINT, p_now BIGINT)
RETURNS TABLE (used BIGINT, credited BIGINT, credit_used BIGINT, held BIGINT)
LANGUAGE sql STABLE AS $$
    SELECT
        (SELECT COALESCE(SUM(t.used_micro_usd), 0) FROM ai_usage_period_totals AS t
          WHERE t.practice_id = p_practice_id AND t.period_start = p_period_start)::BIGINT,
        (SELECT COALESCE(SUM(c.amount_internal_micro_usd), 0) FROM ai_credit_ledger AS c
          WHERE c.practice_id = p_practice_id AND c.status = 'succeeded')::BIGINT,
        (SELECT COALESCE(SUM(t.used_credit_micro_usd), 0) FROM ai_usage_period_totals AS t
          WHERE t.practice_id = p_practice_id)::BIGINT,
        (SELECT COALESCE(SUM(h.amount_micro_usd), 0) FROM ai_budget_holds AS h
          WHERE h.practice_id = p_practice_id AND h.expires_at > p_now)::BIGINT
$$;
