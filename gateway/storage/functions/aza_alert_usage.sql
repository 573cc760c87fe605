-- One PostgreSQL function, defined here only; migrations apply it with
-- CREATE OR REPLACE (`\ir ../../functions/<name>.sql`, gateway/storage/__init__.py).
--
-- The trigger function of the period totals (trigger ai_alert_usage,
-- migration 012): budget.threshold_crossed when usage reaches one of the
-- period's alert marks, and credit.low when usage takes the extra credit left
-- below the practice's amount (once per amount until the next credit: the
-- dedupe key names the latest credit). The extra credit left is read from
-- aza_money, the money SQL written once. The same rules as SQLite's triggers
-- (migrations 012 and 014); tests/alerts run both.

CREATE OR REPLACE FUNCTION aza_alert_usage() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    old_used BIGINT := 0;
    old_credit BIGINT := 0;
    below BIGINT;
    balance BIGINT;
    last_credit BIGINT;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        old_used := OLD.used_micro_usd;
        old_credit := OLD.used_credit_micro_usd;
    END IF;
    IF NEW.used_micro_usd > old_used THEN
        INSERT INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key, period_start,
            threshold, amount_micro_usd, limit_micro_usd, created_at)
        SELECT aza_alert_id(), m.practice_id, 'budget.threshold_crossed',
            m.percent || ':' || m.period_start, m.period_start, m.percent, NEW.used_micro_usd,
            m.budget_micro_usd, aza_alert_now()
        FROM ai_alert_marks AS m
        WHERE m.practice_id = NEW.practice_id AND m.period_start = NEW.period_start
            AND (TG_OP = 'INSERT' OR m.mark_micro_usd > old_used)
            AND m.mark_micro_usd <= NEW.used_micro_usd
        ON CONFLICT DO NOTHING;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.used_credit_micro_usd > old_credit THEN
        SELECT s.extra_credit_below_micro_usd INTO below FROM ai_alert_settings AS s
        WHERE s.practice_id = NEW.practice_id;
        IF below IS NOT NULL THEN
            SELECT m.credited - m.credit_used INTO balance
              FROM aza_money(NEW.practice_id, NEW.period_start, 0) AS m;
            SELECT COALESCE(MAX(c.id), 0) INTO last_credit FROM ai_credit_ledger AS c
             WHERE c.practice_id = NEW.practice_id AND c.status = 'succeeded'
               AND c.amount_internal_micro_usd > 0;
            IF balance < below AND balance + NEW.used_credit_micro_usd - old_credit >= below THEN
                INSERT INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key,
                    period_start, amount_micro_usd, limit_micro_usd, created_at)
                VALUES (aza_alert_id(), NEW.practice_id, 'credit.low',
                    below || ':' || last_credit, NEW.period_start, balance, below,
                    aza_alert_now())
                ON CONFLICT DO NOTHING;
            END IF;
        END IF;
    END IF;
    RETURN NULL;
END;
$$;
