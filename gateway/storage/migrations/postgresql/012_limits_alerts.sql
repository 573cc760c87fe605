-- Issue 18: per-key and per-device limits inside a practice, and alerts.
--
-- Alerts are decided by triggers, so that the row that says "send this" is
-- written in the same transaction as the charge or ledger entry that made
-- it true, whichever code path writes that entry (aza_settle included); the
-- unique index on (practice_id, alert_type, dedupe_key) makes each alert
-- exist once, across instances and restarts. A worker delivers the rows
-- (gateway/alerts/). The same rules as sqlite/012_limits_alerts.sql;
-- tests/alerts run both.

CREATE TABLE IF NOT EXISTS ai_alert_settings (
    practice_id TEXT PRIMARY KEY,
    budget_used_percent TEXT NOT NULL DEFAULT '[50, 80, 95, 100]',
    extra_credit_below_micro_usd BIGINT,
    key_cap_percent BIGINT NOT NULL DEFAULT 80,
    email TEXT,
    webhook_url TEXT,
    webhook_secret TEXT,
    language TEXT NOT NULL DEFAULT 'de',
    updated_at BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS ai_alert_marks (
    practice_id TEXT NOT NULL,
    period_start BIGINT NOT NULL,
    percent BIGINT NOT NULL,
    mark_micro_usd BIGINT NOT NULL,
    budget_micro_usd BIGINT NOT NULL,
    PRIMARY KEY (practice_id, period_start, percent)
);

CREATE TABLE IF NOT EXISTS ai_alert_outbox (
    id TEXT PRIMARY KEY,
    practice_id TEXT NOT NULL,
    alert_type TEXT NOT NULL,
    dedupe_key TEXT NOT NULL,
    period_start BIGINT,
    threshold BIGINT,
    amount_micro_usd BIGINT,
    limit_micro_usd BIGINT,
    paid_rappen BIGINT,
    subject TEXT,
    reason TEXT,
    created_at BIGINT NOT NULL,
    email_state TEXT NOT NULL DEFAULT 'pending',
    webhook_state TEXT NOT NULL DEFAULT 'pending',
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL DEFAULT 0,
    claimed_until_ms BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    done_at BIGINT
);
CREATE UNIQUE INDEX IF NOT EXISTS ai_alert_outbox_once
    ON ai_alert_outbox (practice_id, alert_type, dedupe_key);
CREATE INDEX IF NOT EXISTS ai_alert_outbox_due
    ON ai_alert_outbox (next_attempt_ms) WHERE done_at IS NULL;
CREATE INDEX IF NOT EXISTS ai_alert_outbox_by_practice
    ON ai_alert_outbox (practice_id, period_start);

CREATE TABLE IF NOT EXISTS ai_spend_limits (
    practice_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    subject TEXT NOT NULL,
    monthly_cap_micro_usd BIGINT,
    requests_per_minute BIGINT,
    tokens_per_minute BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (practice_id, scope, subject)
);

CREATE TABLE IF NOT EXISTS ai_limit_totals (
    practice_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    subject TEXT NOT NULL,
    period_start BIGINT NOT NULL,
    used_micro_usd BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (practice_id, scope, subject, period_start)
);

CREATE TABLE IF NOT EXISTS ai_limit_holds (
    practice_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    subject TEXT NOT NULL,
    hold_id TEXT NOT NULL,
    amount_micro_usd BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (practice_id, scope, subject, hold_id)
);

CREATE TABLE IF NOT EXISTS ai_rate_windows (
    practice_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    subject TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    PRIMARY KEY (practice_id, scope, subject, window_start)
);

CREATE OR REPLACE FUNCTION aza_alert_id() RETURNS TEXT LANGUAGE sql VOLATILE AS $$
    SELECT 'alrt_' || substr(replace(gen_random_uuid()::text, '-', ''), 1, 24)
$$;

CREATE OR REPLACE FUNCTION aza_alert_now() RETURNS BIGINT LANGUAGE sql STABLE AS $$
    SELECT EXTRACT(EPOCH FROM clock_timestamp())::BIGINT
$$;

-- budget.threshold_crossed and credit.low, on the period totals.
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
            SELECT COALESCE(SUM(amount_internal_micro_usd), 0),
                   COALESCE(MAX(id) FILTER (WHERE amount_internal_micro_usd > 0), 0)
              INTO balance, last_credit
              FROM ai_credit_ledger WHERE practice_id = NEW.practice_id AND status = 'succeeded';
            balance := balance - (SELECT COALESCE(SUM(used_credit_micro_usd), 0)
                                  FROM ai_usage_period_totals
                                  WHERE practice_id = NEW.practice_id);
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

DROP TRIGGER IF EXISTS ai_alert_usage ON ai_usage_period_totals;
CREATE TRIGGER ai_alert_usage AFTER INSERT OR UPDATE ON ai_usage_period_totals
    FOR EACH ROW EXECUTE FUNCTION aza_alert_usage();

-- topup.succeeded and auto_topup.failed, on the ledger.
CREATE OR REPLACE FUNCTION aza_alert_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    kind TEXT;
BEGIN
    IF NEW.status = 'succeeded' AND NEW.event_type IN ('topup_purchase', 'auto_topup_purchase')
       AND (TG_OP = 'INSERT' OR OLD.status = 'pending') THEN
        kind := 'topup.succeeded';
    ELSIF NEW.status = 'failed' AND (
        (TG_OP = 'INSERT' AND NEW.event_type = 'failed_auto_topup')
        OR (TG_OP = 'UPDATE' AND OLD.status = 'pending')) THEN
        kind := 'auto_topup.failed';
    ELSE
        RETURN NULL;
    END IF;
    INSERT INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key, amount_micro_usd,
        paid_rappen, subject, reason, created_at)
    VALUES (aza_alert_id(), NEW.practice_id, kind, NEW.id::TEXT,
        CASE WHEN kind = 'topup.succeeded' THEN NEW.amount_internal_micro_usd END,
        NEW.amount_paid_rappen, NEW.id::TEXT,
        CASE WHEN kind = 'topup.succeeded' THEN NEW.event_type
             ELSE NEW.meta_json::jsonb ->> 'failure_reason' END,
        aza_alert_now())
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS ai_alert_ledger ON ai_credit_ledger;
CREATE TRIGGER ai_alert_ledger AFTER INSERT OR UPDATE OF status ON ai_credit_ledger
    FOR EACH ROW EXECUTE FUNCTION aza_alert_ledger();

-- auto_topup.paused and payment.action_required, on the top-up settings.
CREATE OR REPLACE FUNCTION aza_alert_paused() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.auto_topup_enabled <> 0 AND NEW.auto_topup_enabled = 0
       AND NEW.paused_reason IS NOT NULL THEN
        INSERT INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key, reason, created_at)
        VALUES (aza_alert_id(), NEW.practice_id, 'auto_topup.paused', NEW.updated_at::TEXT,
            NEW.paused_reason, aza_alert_now())
        ON CONFLICT DO NOTHING;
        IF NEW.paused_reason = 'AUTO_TOPUP_REQUIRES_ACTION' THEN
            INSERT INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key, reason,
                created_at)
            VALUES (aza_alert_id(), NEW.practice_id, 'payment.action_required',
                NEW.updated_at::TEXT, NEW.paused_reason, aza_alert_now())
            ON CONFLICT DO NOTHING;
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS ai_alert_paused ON ai_topup_settings;
CREATE TRIGGER ai_alert_paused AFTER UPDATE ON ai_topup_settings
    FOR EACH ROW EXECUTE FUNCTION aza_alert_paused();

-- key.cap_near, on a capped key's or device's spend.
CREATE OR REPLACE FUNCTION aza_alert_key_cap() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    old_used BIGINT := 0;
    cap BIGINT;
    pct BIGINT;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        old_used := OLD.used_micro_usd;
    END IF;
    SELECT l.monthly_cap_micro_usd INTO cap FROM ai_spend_limits AS l
    WHERE l.practice_id = NEW.practice_id AND l.scope = NEW.scope AND l.subject = NEW.subject;
    IF cap IS NULL THEN
        RETURN NULL;
    END IF;
    pct := COALESCE((SELECT key_cap_percent FROM ai_alert_settings
                     WHERE practice_id = NEW.practice_id), 80);
    IF (TG_OP = 'INSERT' OR old_used * 100 < cap * pct) AND NEW.used_micro_usd * 100 >= cap * pct
    THEN
        INSERT INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key, period_start,
            threshold, amount_micro_usd, limit_micro_usd, subject, reason, created_at)
        VALUES (aza_alert_id(), NEW.practice_id, 'key.cap_near',
            NEW.scope || ':' || NEW.subject || ':' || pct || ':' || NEW.period_start,
            NEW.period_start, pct, NEW.used_micro_usd, cap, NEW.subject, NEW.scope,
            aza_alert_now())
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS ai_alert_key_cap ON ai_limit_totals;
CREATE TRIGGER ai_alert_key_cap AFTER INSERT OR UPDATE ON ai_limit_totals
    FOR EACH ROW EXECUTE FUNCTION aza_alert_key_cap();
