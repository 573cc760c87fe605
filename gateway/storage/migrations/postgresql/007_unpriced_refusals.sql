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
-- is pending until it is settled (done_at): its hold row is 'bg:' || response_id,
-- and the generic follower (aza_upstream_jobs, kind background_response) polls it.
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
    done_at INTEGER
);
