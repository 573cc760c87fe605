-- Files and Batch API (issue 16), and the jobs the gateway follows upstream.
--
-- aza_upstream_jobs: the generic follower's queue (gateway/followers.py).
-- One row per upstream job (a batch, a background response) that some
-- gateway instance must poll until it ends. An instance claims a due row by
-- setting lease_owner and lease_until (milliseconds since the epoch) in one
-- conditional UPDATE, so two instances never poll the same job at once; a
-- lease that runs out (its instance died) lets another one take the job
-- over, so a job is resumed after a restart. state: open | done.
CREATE TABLE IF NOT EXISTS aza_upstream_jobs (
    kind TEXT NOT NULL,
    job_id TEXT NOT NULL,
    practice_id TEXT NOT NULL,
    payload_json TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT 'open',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_poll_at INTEGER NOT NULL,
    lease_owner TEXT,
    lease_until INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (kind, job_id)
);
CREATE INDEX IF NOT EXISTS aza_upstream_jobs_due ON aza_upstream_jobs (state, next_poll_at);

-- Which practice owns each upstream file, upload and batch id: a practice
-- sees only its own, another's id answers 404 as if it did not exist.
CREATE TABLE IF NOT EXISTS aza_upstream_objects (
    object_id TEXT PRIMARY KEY,
    object_type TEXT NOT NULL,
    practice_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    deleted_at INTEGER
);
CREATE INDEX IF NOT EXISTS aza_upstream_objects_by_practice
    ON aza_upstream_objects (practice_id, object_type, created_at);

-- A batch as the gateway meters it: the hold of its whole estimate (at the
-- batch price) while it runs, then its lines' usage events
-- (request_id batch:<batch_id>:<custom_id>) and the total charged.
CREATE TABLE IF NOT EXISTS aza_batches (
    batch_id TEXT PRIMARY KEY,
    practice_id TEXT NOT NULL,
    subscription_id TEXT,
    hold_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    lines INTEGER NOT NULL,
    estimate_micro_usd INTEGER NOT NULL,
    status TEXT NOT NULL,
    completed_lines INTEGER NOT NULL DEFAULT 0,
    failed_lines INTEGER NOT NULL DEFAULT 0,
    cost_micro_usd INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    settled_at INTEGER
);
CREATE INDEX IF NOT EXISTS aza_batches_by_practice ON aza_batches (practice_id, created_at);
