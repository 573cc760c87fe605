-- Issue 18: per-key and per-device limits inside a practice, and alerts.
--
-- Alerts are decided by triggers, so that the row that says "send this" is
-- written in the same transaction as the charge or ledger entry that made
-- it true, whichever code path writes that entry; the unique index on
-- (practice_id, alert_type, dedupe_key) makes each alert exist once, across
-- instances and restarts. A worker delivers the rows (gateway/alerts/).
-- The same triggers exist for PostgreSQL (postgresql/012_limits_alerts.sql);
-- tests/alerts run both.

-- Alert settings of a practice (GET/PUT /v1/ai-credit/alerts); no row: defaults.
CREATE TABLE IF NOT EXISTS ai_alert_settings (
    practice_id TEXT PRIMARY KEY,
    budget_used_percent TEXT NOT NULL DEFAULT '[50, 80, 95, 100]',  -- JSON list
    extra_credit_below_micro_usd INTEGER,
    key_cap_percent INTEGER NOT NULL DEFAULT 80,
    email TEXT,
    webhook_url TEXT,
    -- The HMAC key of the practice's webhook signatures: kept (it signs every
    -- delivery), shown to the admin once, never in an answer after that.
    webhook_secret TEXT,
    language TEXT NOT NULL DEFAULT 'de',
    updated_at INTEGER NOT NULL
);

-- The budget thresholds of one period in micro-USD (percent of that period's
-- budget), written by the gateway when it first meets the period (and when
-- the settings change), read by the trigger on the period totals.
CREATE TABLE IF NOT EXISTS ai_alert_marks (
    practice_id TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    percent INTEGER NOT NULL,
    mark_micro_usd INTEGER NOT NULL,
    budget_micro_usd INTEGER NOT NULL,
    PRIMARY KEY (practice_id, period_start, percent)
) WITHOUT ROWID;

-- The outbox: one row per alert, delivered by email and/or webhook. A
-- channel's state: pending, sent, off (not configured), failed (gave up).
CREATE TABLE IF NOT EXISTS ai_alert_outbox (
    id TEXT PRIMARY KEY,
    practice_id TEXT NOT NULL,
    alert_type TEXT NOT NULL,
    dedupe_key TEXT NOT NULL,
    period_start INTEGER,
    threshold INTEGER,
    amount_micro_usd INTEGER,
    limit_micro_usd INTEGER,
    paid_rappen INTEGER,
    subject TEXT,
    reason TEXT,
    created_at INTEGER NOT NULL,
    email_state TEXT NOT NULL DEFAULT 'pending',
    webhook_state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL DEFAULT 0,
    claimed_until_ms INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    done_at INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS ai_alert_outbox_once
    ON ai_alert_outbox (practice_id, alert_type, dedupe_key);
CREATE INDEX IF NOT EXISTS ai_alert_outbox_due
    ON ai_alert_outbox (next_attempt_ms) WHERE done_at IS NULL;
CREATE INDEX IF NOT EXISTS ai_alert_outbox_by_practice
    ON ai_alert_outbox (practice_id, period_start);

-- Limits of one key (scope 'key', subject its prefix) or one X-Device-Id
-- (scope 'device'); NULL: no such limit. No row: no limits at all.
CREATE TABLE IF NOT EXISTS ai_spend_limits (
    practice_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    subject TEXT NOT NULL,
    monthly_cap_micro_usd INTEGER,
    requests_per_minute INTEGER,
    tokens_per_minute INTEGER,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (practice_id, scope, subject)
) WITHOUT ROWID;

-- What a capped key or device spent in a budget period (settles add to it).
CREATE TABLE IF NOT EXISTS ai_limit_totals (
    practice_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    subject TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    used_micro_usd INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (practice_id, scope, subject, period_start)
) WITHOUT ROWID;

-- Estimates of a capped key's or device's requests in flight.
CREATE TABLE IF NOT EXISTS ai_limit_holds (
    practice_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    subject TEXT NOT NULL,
    hold_id TEXT NOT NULL,
    amount_micro_usd INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (practice_id, scope, subject, hold_id)
) WITHOUT ROWID;

-- Requests and tokens of a rate-limited key or device per fixed window.
CREATE TABLE IF NOT EXISTS ai_rate_windows (
    practice_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    subject TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (practice_id, scope, subject, window_start)
) WITHOUT ROWID;

-- budget.threshold_crossed: the period's usage passed a mark.
CREATE TRIGGER IF NOT EXISTS ai_alert_budget_insert AFTER INSERT ON ai_usage_period_totals
BEGIN
    INSERT OR IGNORE INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key,
        period_start, threshold, amount_micro_usd, limit_micro_usd, created_at)
    SELECT 'alrt_' || lower(hex(randomblob(12))), m.practice_id, 'budget.threshold_crossed',
        m.percent || ':' || m.period_start, m.period_start, m.percent, NEW.used_micro_usd,
        m.budget_micro_usd, CAST(strftime('%s', 'now') AS INTEGER)
    FROM ai_alert_marks AS m
    WHERE m.practice_id = NEW.practice_id AND m.period_start = NEW.period_start
        AND m.mark_micro_usd <= NEW.used_micro_usd;
END;

CREATE TRIGGER IF NOT EXISTS ai_alert_budget_update
AFTER UPDATE OF used_micro_usd ON ai_usage_period_totals
WHEN NEW.used_micro_usd > OLD.used_micro_usd
BEGIN
    INSERT OR IGNORE INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key,
        period_start, threshold, amount_micro_usd, limit_micro_usd, created_at)
    SELECT 'alrt_' || lower(hex(randomblob(12))), m.practice_id, 'budget.threshold_crossed',
        m.percent || ':' || m.period_start, m.period_start, m.percent, NEW.used_micro_usd,
        m.budget_micro_usd, CAST(strftime('%s', 'now') AS INTEGER)
    FROM ai_alert_marks AS m
    WHERE m.practice_id = NEW.practice_id AND m.period_start = NEW.period_start
        AND m.mark_micro_usd > OLD.used_micro_usd AND m.mark_micro_usd <= NEW.used_micro_usd;
END;

-- credit.low: usage took extra credit below the practice's amount. Once per
-- amount until the next credit (the dedupe key names the latest credit).
CREATE TRIGGER IF NOT EXISTS ai_alert_credit_low
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
            (SELECT COALESCE(SUM(amount_internal_micro_usd), 0) FROM ai_credit_ledger
              WHERE practice_id = NEW.practice_id AND status = 'succeeded')
            - (SELECT COALESCE(SUM(used_credit_micro_usd), 0) FROM ai_usage_period_totals
              WHERE practice_id = NEW.practice_id) AS balance,
            (SELECT COALESCE(MAX(id), 0) FROM ai_credit_ledger
              WHERE practice_id = NEW.practice_id AND status = 'succeeded'
                AND amount_internal_micro_usd > 0) AS last_credit) AS b
    WHERE s.practice_id = NEW.practice_id AND s.extra_credit_below_micro_usd IS NOT NULL
        AND b.balance < s.extra_credit_below_micro_usd
        AND b.balance + NEW.used_credit_micro_usd - OLD.used_credit_micro_usd
            >= s.extra_credit_below_micro_usd;
END;

-- topup.succeeded: a purchase credited, booked as such or a pending one settled.
CREATE TRIGGER IF NOT EXISTS ai_alert_topup_insert AFTER INSERT ON ai_credit_ledger
WHEN NEW.status = 'succeeded' AND NEW.event_type IN ('topup_purchase', 'auto_topup_purchase')
BEGIN
    INSERT OR IGNORE INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key,
        amount_micro_usd, paid_rappen, subject, reason, created_at)
    VALUES ('alrt_' || lower(hex(randomblob(12))), NEW.practice_id, 'topup.succeeded',
        CAST(NEW.id AS TEXT), NEW.amount_internal_micro_usd, NEW.amount_paid_rappen,
        CAST(NEW.id AS TEXT), NEW.event_type, CAST(strftime('%s', 'now') AS INTEGER));
END;

CREATE TRIGGER IF NOT EXISTS ai_alert_topup_settled AFTER UPDATE OF status ON ai_credit_ledger
WHEN OLD.status = 'pending' AND NEW.status = 'succeeded'
BEGIN
    INSERT OR IGNORE INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key,
        amount_micro_usd, paid_rappen, subject, reason, created_at)
    VALUES ('alrt_' || lower(hex(randomblob(12))), NEW.practice_id, 'topup.succeeded',
        CAST(NEW.id AS TEXT), NEW.amount_internal_micro_usd, NEW.amount_paid_rappen,
        CAST(NEW.id AS TEXT), NEW.event_type, CAST(strftime('%s', 'now') AS INTEGER));
END;

-- auto_topup.failed: a pending automatic top-up failed, or one was booked as failed.
CREATE TRIGGER IF NOT EXISTS ai_alert_auto_topup_failed AFTER UPDATE OF status ON ai_credit_ledger
WHEN OLD.status = 'pending' AND NEW.status = 'failed'
BEGIN
    INSERT OR IGNORE INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key,
        paid_rappen, subject, reason, created_at)
    VALUES ('alrt_' || lower(hex(randomblob(12))), NEW.practice_id, 'auto_topup.failed',
        CAST(NEW.id AS TEXT), NEW.amount_paid_rappen, CAST(NEW.id AS TEXT),
        json_extract(NEW.meta_json, '$.failure_reason'), CAST(strftime('%s', 'now') AS INTEGER));
END;

CREATE TRIGGER IF NOT EXISTS ai_alert_auto_topup_failed_insert AFTER INSERT ON ai_credit_ledger
WHEN NEW.status = 'failed' AND NEW.event_type = 'failed_auto_topup'
BEGIN
    INSERT OR IGNORE INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key,
        paid_rappen, subject, reason, created_at)
    VALUES ('alrt_' || lower(hex(randomblob(12))), NEW.practice_id, 'auto_topup.failed',
        CAST(NEW.id AS TEXT), NEW.amount_paid_rappen, CAST(NEW.id AS TEXT),
        json_extract(NEW.meta_json, '$.failure_reason'), CAST(strftime('%s', 'now') AS INTEGER));
END;

-- auto_topup.paused and payment.action_required: the settings were paused.
CREATE TRIGGER IF NOT EXISTS ai_alert_auto_topup_paused AFTER UPDATE ON ai_topup_settings
WHEN OLD.auto_topup_enabled <> 0 AND NEW.auto_topup_enabled = 0 AND NEW.paused_reason IS NOT NULL
BEGIN
    INSERT OR IGNORE INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key, reason,
        created_at)
    VALUES ('alrt_' || lower(hex(randomblob(12))), NEW.practice_id, 'auto_topup.paused',
        CAST(NEW.updated_at AS TEXT), NEW.paused_reason, CAST(strftime('%s', 'now') AS INTEGER));
    INSERT OR IGNORE INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key, reason,
        created_at)
    SELECT 'alrt_' || lower(hex(randomblob(12))), NEW.practice_id, 'payment.action_required',
        CAST(NEW.updated_at AS TEXT), NEW.paused_reason, CAST(strftime('%s', 'now') AS INTEGER)
    WHERE NEW.paused_reason = 'AUTO_TOPUP_REQUIRES_ACTION';
END;

-- key.cap_near: a capped key's or device's spend passed its alert percent.
CREATE TRIGGER IF NOT EXISTS ai_alert_key_cap_insert AFTER INSERT ON ai_limit_totals
BEGIN
    INSERT OR IGNORE INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key,
        period_start, threshold, amount_micro_usd, limit_micro_usd, subject, reason, created_at)
    SELECT 'alrt_' || lower(hex(randomblob(12))), NEW.practice_id, 'key.cap_near',
        NEW.scope || ':' || NEW.subject || ':' || p.pct || ':' || NEW.period_start,
        NEW.period_start, p.pct, NEW.used_micro_usd, l.monthly_cap_micro_usd, NEW.subject,
        NEW.scope, CAST(strftime('%s', 'now') AS INTEGER)
    FROM ai_spend_limits AS l,
        (SELECT COALESCE((SELECT key_cap_percent FROM ai_alert_settings
            WHERE practice_id = NEW.practice_id), 80) AS pct) AS p
    WHERE l.practice_id = NEW.practice_id AND l.scope = NEW.scope AND l.subject = NEW.subject
        AND l.monthly_cap_micro_usd IS NOT NULL
        AND NEW.used_micro_usd * 100 >= l.monthly_cap_micro_usd * p.pct;
END;

CREATE TRIGGER IF NOT EXISTS ai_alert_key_cap_update
AFTER UPDATE OF used_micro_usd ON ai_limit_totals
WHEN NEW.used_micro_usd > OLD.used_micro_usd
BEGIN
    INSERT OR IGNORE INTO ai_alert_outbox (id, practice_id, alert_type, dedupe_key,
        period_start, threshold, amount_micro_usd, limit_micro_usd, subject, reason, created_at)
    SELECT 'alrt_' || lower(hex(randomblob(12))), NEW.practice_id, 'key.cap_near',
        NEW.scope || ':' || NEW.subject || ':' || p.pct || ':' || NEW.period_start,
        NEW.period_start, p.pct, NEW.used_micro_usd, l.monthly_cap_micro_usd, NEW.subject,
        NEW.scope, CAST(strftime('%s', 'now') AS INTEGER)
    FROM ai_spend_limits AS l,
        (SELECT COALESCE((SELECT key_cap_percent FROM ai_alert_settings
            WHERE practice_id = NEW.practice_id), 80) AS pct) AS p
    WHERE l.practice_id = NEW.practice_id AND l.scope = NEW.scope AND l.subject = NEW.subject
        AND l.monthly_cap_micro_usd IS NOT NULL
        AND OLD.used_micro_usd * 100 < l.monthly_cap_micro_usd * p.pct
        AND NEW.used_micro_usd * 100 >= l.monthly_cap_micro_usd * p.pct;
END;
