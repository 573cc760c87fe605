-- Issue 14: the money SQL written once. SQLite's credit alert reads the
-- extra credit left through the fragment the engine-neutral code runs
-- (credit/money_sql.py extra_credit_sql, put in by name when this migration
-- is applied, gateway/storage/__init__.py) instead of its own sums
-- (migration 012 wrote them again). The same rule as PostgreSQL's
-- aza_alert_usage (gateway/storage/functions/aza_alert_usage.sql).

DROP TRIGGER IF EXISTS ai_alert_credit_low;

-- credit.low: usage took extra credit below the practice's amount. Once per
-- amount until the next credit (the dedupe key names the latest credit).
CREATE TRIGGER ai_alert_credit_low
AFTER UPDATE OF used_credit_micro_usd ON ai_usage_period_totals
WHEN NEW.used_credit_micro_usd > OLD.used_credit_micro_usd
BEGIN
    INSERT OR IGNORE INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key,
        period_start, amount_micro_usd, limit_micro_usd, created_at)
    SELECT 'alrt_' || lower(hex(randomblob(12))), s.practice_id, 'credit.low',
        s.extra_credit_below_micro_usd || ':' || b.last_credit, NEW.period_start, b.balance,
        s.extra_credit_below_micro_usd, CAST(strftime('%s', 'now') AS INTEGER)
    FROM ai_alert_settings AS s,
        (SELECT
            {{ extra_credit(NEW.practice_id) }} AS balance,
            (SELECT COALESCE(MAX(id), 0) FROM ai_credit_ledger
              WHERE practice_id = NEW.practice_id AND status = 'succeeded'
                AND amount_internal_micro_usd > 0) AS last_credit) AS b
    WHERE s.practice_id = NEW.practice_id AND s.extra_credit_below_micro_usd IS NOT NULL
        AND b.balance < s.extra_credit_below_micro_usd
        AND b.balance + NEW.used_credit_micro_usd - OLD.used_credit_micro_usd
            >= s.extra_credit_below_micro_usd;
END;
