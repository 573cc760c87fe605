-- Budget leases (PostgreSQL functions of migration 004, changed).
--
-- A gate may now place a lease: one hold of several requests' estimates
-- (p_lease), placed only while at least p_lease_floor is available, which
-- the gateway then admits its next requests of the practice against without
-- a round trip (gateway/storage/leases.py, Lease). Each of those requests
-- settles its own share: aza_settle takes p_hold_micro_usd off the hold and
-- deletes it when nothing is left, instead of deleting it whole. For a hold
-- of one request the share is the whole hold, so nothing changes there.
--
-- aza_reserve's parameters change, so it and aza_reserve_many are dropped
-- and made again; aza_settle keeps its parameters.

DROP FUNCTION IF EXISTS aza_reserve_many(TEXT[], BOOLEAN, BIGINT[], TEXT[], BIGINT[], BIGINT[],
    TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], BIGINT[], BIGINT[], BIGINT[], BIGINT[], TEXT[],
    TEXT[], BIGINT[]);
DROP FUNCTION IF EXISTS aza_reserve(BIGINT, TEXT, TEXT[], BIGINT, BIGINT, TEXT, TEXT, TEXT, TEXT,
    TEXT, BIGINT, BIGINT, BIGINT, BIGINT, TEXT, TEXT, BIGINT, BOOLEAN);

\ir ../../functions/aza_reserve.sql
\ir ../../functions/aza_reserve_many.sql
\ir ../../functions/aza_settle.sql
