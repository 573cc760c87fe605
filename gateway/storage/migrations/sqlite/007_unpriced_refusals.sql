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
