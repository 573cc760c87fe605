-- Holds are written twice per request (placed, then settled or released), so
-- every page they touch is a page each commit writes to the WAL. As a rowid
-- table with a separate primary-key index and a practice index, placing or
-- deleting one hold wrote three pages; clustered on (practice_id, hold_id)
-- WITHOUT ROWID it writes one, and the gate's per-practice sum reads one
-- contiguous range. Holds in flight move over as they are.

CREATE TABLE ai_budget_holds_clustered (
    practice_id TEXT NOT NULL,
    hold_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    amount_micro_usd INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (practice_id, hold_id)
) WITHOUT ROWID;

INSERT INTO ai_budget_holds_clustered
    (practice_id, hold_id, request_id, amount_micro_usd, created_at, expires_at)
SELECT practice_id, hold_id, request_id, amount_micro_usd, created_at, expires_at
FROM ai_budget_holds;

DROP TABLE ai_budget_holds;

ALTER TABLE ai_budget_holds_clustered RENAME TO ai_budget_holds;
