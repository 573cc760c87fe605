-- One PostgreSQL function, defined here only; migrations apply it with
-- CREATE OR REPLACE (`\ir ../../functions/<name>.sql`, gateway/storage/__init__.py).
--
-- aza_reserve for several gates of one practice.
-- Several calls of one practice as one statement: the calls one after
-- another, in the order given, in one transaction (one COMMIT, one WAL flush
-- for all). Each call sees the ones before it, as if each had waited for the
-- one before on the practice's lock. Parameters are the single call's, one
-- array element per call (shared ones passed once); `call` numbers the
-- answers from 1.

CREATE OR REPLACE FUNCTION aza_reserve_many(
    p_usable TEXT[],
    p_durable BOOLEAN,
    p_lock BIGINT[],
    p_practice_id TEXT[],
    p_period_start BIGINT[],
    p_now BIGINT[],
    p_subscription_id TEXT[],
    p_status TEXT[],
    p_lookup_key TEXT[],
    p_customer_id TEXT[],
    p_customer_email TEXT[],
    p_license_start BIGINT[],
    p_license_end BIGINT[],
    p_budget BIGINT[],
    p_estimate BIGINT[],
    p_hold_id TEXT[],
    p_request_id TEXT[],
    p_expires_at BIGINT[],
    p_lease BIGINT[],
    p_lease_floor BIGINT[]
) RETURNS TABLE (
    call INTEGER,
    subscription_id TEXT,
    practice_id TEXT,
    status TEXT,
    lookup_key TEXT,
    customer_id TEXT,
    customer_email TEXT,
    current_period_start BIGINT,
    current_period_end BIGINT,
    used BIGINT,
    credited BIGINT,
    credit_used BIGINT,
    held BIGINT,
    hold_micro_usd BIGINT
)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    FOR i IN 1 .. cardinality(p_lock) LOOP
        RETURN QUERY SELECT i, r.* FROM aza_reserve(
            p_lock[i], p_practice_id[i], p_usable, p_period_start[i], p_now[i],
            p_subscription_id[i], p_status[i], p_lookup_key[i], p_customer_id[i],
            p_customer_email[i], p_license_start[i], p_license_end[i], p_budget[i],
            p_estimate[i], p_hold_id[i], p_request_id[i], p_expires_at[i], p_lease[i],
            p_lease_floor[i], p_durable) AS r;
    END LOOP;
END;
$$;
