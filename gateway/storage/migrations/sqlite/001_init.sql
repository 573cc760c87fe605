-- AzA gateway schema, SQLite. Money is integer: micro-USD (1e-6 USD) and
-- Rappen (1e-2 CHF). The seed's column names (estimated_cost_usd,
-- amount_internal_usd, amount_paid_chf) stay, as read-only columns derived
-- from the exact integers; nothing ever does arithmetic on them.

CREATE TABLE IF NOT EXISTS licenses (
    subscription_id TEXT PRIMARY KEY,
    customer_id TEXT,
    status TEXT,
    lookup_key TEXT,
    allowed_users INTEGER,
    devices_per_user INTEGER,
    customer_email TEXT,
    client_reference_id TEXT,
    current_period_end INTEGER,
    current_period_start INTEGER,
    updated_at INTEGER NOT NULL,
    license_key TEXT,
    practice_id TEXT
);
CREATE INDEX IF NOT EXISTS licenses_by_practice ON licenses (practice_id, status);

CREATE TABLE IF NOT EXISTS gateway_keys (
    key_hash TEXT PRIMARY KEY,
    key_prefix TEXT NOT NULL,
    practice_id TEXT NOT NULL,
    label TEXT,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX IF NOT EXISTS gateway_keys_by_practice ON gateway_keys (practice_id);

CREATE TABLE IF NOT EXISTS ai_usage_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    practice_id TEXT NOT NULL,
    subscription_id TEXT,
    customer_email TEXT,
    device_id TEXT,
    request_id TEXT NOT NULL,
    operation_type TEXT NOT NULL,
    model TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    audio_seconds REAL NOT NULL DEFAULT 0,
    characters INTEGER NOT NULL DEFAULT 0,
    images INTEGER NOT NULL DEFAULT 0,
    estimated_cost_micro_usd INTEGER NOT NULL,
    estimated_cost_usd REAL GENERATED ALWAYS AS (estimated_cost_micro_usd / 1000000.0) VIRTUAL,
    charged_budget_micro_usd INTEGER NOT NULL DEFAULT 0,
    charged_credit_micro_usd INTEGER NOT NULL DEFAULT 0,
    -- What the gate reserved for this request (NULL: written without a hold).
    hold_micro_usd INTEGER,
    usage_estimated INTEGER NOT NULL DEFAULT 0,
    period_start INTEGER NOT NULL,
    period_end INTEGER NOT NULL,
    status TEXT NOT NULL,
    started_at INTEGER,
    created_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS ai_usage_events_one_per_request ON ai_usage_events (request_id);
CREATE INDEX IF NOT EXISTS ai_usage_events_by_period ON ai_usage_events (practice_id, period_start);

-- Running totals per practice and period, written in the same transaction as
-- each usage event (so the gate reads one row instead of summing a month of
-- events); `aza-gateway verify` and the tests check them against the events.
CREATE TABLE IF NOT EXISTS ai_usage_period_totals (
    practice_id TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    used_micro_usd INTEGER NOT NULL DEFAULT 0,
    used_credit_micro_usd INTEGER NOT NULL DEFAULT 0,
    events INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (practice_id, period_start)
);

CREATE TABLE IF NOT EXISTS ai_budget_holds (
    hold_id TEXT PRIMARY KEY,
    practice_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    amount_micro_usd INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ai_budget_holds_by_practice ON ai_budget_holds (practice_id, expires_at);

CREATE TABLE IF NOT EXISTS ai_credit_ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    practice_id TEXT NOT NULL,
    subscription_id TEXT,
    customer_email TEXT,
    event_type TEXT NOT NULL,
    status TEXT NOT NULL,
    amount_internal_micro_usd INTEGER NOT NULL DEFAULT 0,
    amount_internal_usd REAL GENERATED ALWAYS AS (amount_internal_micro_usd / 1000000.0) VIRTUAL,
    amount_paid_rappen INTEGER,
    amount_paid_chf REAL GENERATED ALWAYS AS (amount_paid_rappen / 100.0) VIRTUAL,
    currency TEXT NOT NULL DEFAULT 'chf',
    stripe_checkout_session_id TEXT,
    stripe_payment_intent_id TEXT,
    stripe_charge_id TEXT,
    stripe_refund_id TEXT,
    stripe_event_id TEXT,
    idempotency_key TEXT,
    meta_json TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ai_credit_ledger_by_practice ON ai_credit_ledger (practice_id, status, created_at);
-- Each Stripe object credits once (failed attempts excepted: they credit nothing).
CREATE UNIQUE INDEX IF NOT EXISTS ai_credit_ledger_checkout_once ON ai_credit_ledger (stripe_checkout_session_id)
    WHERE stripe_checkout_session_id IS NOT NULL AND status <> 'failed'
      AND event_type IN ('topup_purchase', 'auto_topup_purchase');
CREATE UNIQUE INDEX IF NOT EXISTS ai_credit_ledger_payment_intent_once ON ai_credit_ledger (stripe_payment_intent_id)
    WHERE stripe_payment_intent_id IS NOT NULL AND status <> 'failed'
      AND event_type IN ('topup_purchase', 'auto_topup_purchase');
CREATE UNIQUE INDEX IF NOT EXISTS ai_credit_ledger_refund_once ON ai_credit_ledger (stripe_refund_id)
    WHERE stripe_refund_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS ai_credit_ledger_idempotency ON ai_credit_ledger (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- One pending automatic top-up per practice: two gateway instances cannot both charge.
CREATE UNIQUE INDEX IF NOT EXISTS ai_credit_ledger_one_pending_auto ON ai_credit_ledger (practice_id)
    WHERE event_type = 'auto_topup_purchase' AND status = 'pending';

CREATE TABLE IF NOT EXISTS ai_topup_settings (
    practice_id TEXT PRIMARY KEY,
    auto_topup_enabled INTEGER NOT NULL DEFAULT 0,
    topup_amount_rappen INTEGER NOT NULL,
    internal_credit_micro_usd INTEGER NOT NULL,
    trigger_below_percent INTEGER NOT NULL,
    monthly_limit_rappen INTEGER NOT NULL,
    stripe_customer_id TEXT,
    default_payment_method_id TEXT,
    paused_reason TEXT,
    updated_at INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS stripe_webhook_events (
    event_id TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    received_at INTEGER NOT NULL
);
