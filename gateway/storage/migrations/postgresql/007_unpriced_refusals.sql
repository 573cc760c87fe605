-- Requests refused because their model (or the service tier asked for) has
-- no price, counted per model and UTC day, for `aza-gateway prices check`.
-- One row per model and day: a refusal is an upsert, never a growing log.
CREATE TABLE IF NOT EXISTS ai_unpriced_refusals (
    model TEXT NOT NULL,
    day INTEGER NOT NULL,
    refusals INTEGER NOT NULL DEFAULT 0,
    last_refused_at INTEGER NOT NULL,
    PRIMARY KEY (model, day)
);

-- Responses stored upstream (store or background) and the practice that made
-- each: only that practice may read, delete or cancel it. A background one
-- is a job until it is settled (done_at): its hold row is 'bg:' || response_id,
-- the gateway polls it at next_poll_at, an instance claims it with lease_until.
CREATE TABLE IF NOT EXISTS ai_responses (
    response_id TEXT PRIMARY KEY,
    practice_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    upstream TEXT,
    service_tier TEXT,
    web_search_preview INTEGER NOT NULL DEFAULT 0,
    hold_micro_usd INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    next_poll_at INTEGER,
    polls INTEGER NOT NULL DEFAULT 0,
    lease_until INTEGER,
    done_at INTEGER
);
CREATE INDEX IF NOT EXISTS ai_responses_due ON ai_responses (next_poll_at) WHERE done_at IS NULL;
