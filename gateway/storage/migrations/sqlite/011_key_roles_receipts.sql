-- Issue 17: two kinds of gateway key, and receipts in the ledger.
--
-- role: 'client' keys call the proxied routes and read the budget; 'admin'
-- keys may also use the credit routes and the console. Every key made before
-- this migration becomes 'legacy', which is admin-capable: it keeps working
-- exactly as before until an operator narrows it (docs/operations.md).
ALTER TABLE gateway_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'legacy'
    CHECK (role IN ('admin', 'client', 'legacy'));

-- The receipt's (or invoice's) URL of a paid top-up, as Stripe hosts it.
ALTER TABLE ai_credit_ledger ADD COLUMN receipt_url TEXT;

-- The usage route and the console read a practice's events by time, page
-- by page in (created_at, id) order (GET /v1/ai-credit/usage, its CSV).
CREATE INDEX IF NOT EXISTS ai_usage_events_by_time ON ai_usage_events (practice_id, created_at, id);
