-- Data residency per practice (issue 19): the regions its requests may be
-- processed in and whether a client's explicit `store: true` may pass to the
-- upstream. NULL in a column: the gateway's default (AZA_DEFAULT_REGIONS,
-- AZA_UPSTREAM_STORE). `regions` holds the labels comma-separated, sorted.

CREATE TABLE practice_residency (
    practice_id TEXT PRIMARY KEY,
    regions TEXT,
    store TEXT CHECK (store IN ('allow', 'deny')),
    updated_at BIGINT NOT NULL
);
