-- One PostgreSQL function, defined here only; migrations apply it with
-- CREATE OR REPLACE (`\ir ../../functions/<name>.sql`, gateway/storage/__init__.py).
--
-- aza_settle for several settles of one practice.
-- Several calls of one practice as one statement: the calls one after
-- another, in the order given, in one transaction (one COMMIT, one WAL flush
-- for all). Each call sees the ones before it, as if each had waited for the
-- one before on the practice's lock. Parameters are the single call's, one
-- array element per call (shared ones passed once); `call` numbers the
-- answers from 1.

CREATE OR REPLACE FUNCTION aza_settle_many(
    p_lock BIGINT[],
    p_hold_id TEXT[],
    p_budget BIGINT[],
    p_now BIGINT[],
    p_practice_id TEXT[],
    p_subscription_id TEXT[],
    p_customer_email TEXT[],
    p_device_id TEXT[],
    p_request_id TEXT[],
    p_operation_type TEXT[],
    p_model TEXT[],
    p_input_tokens BIGINT[],
    p_cached_input_tokens BIGINT[],
    p_output_tokens BIGINT[],
    p_reasoning_tokens BIGINT[],
    p_total_tokens BIGINT[],
    p_audio_seconds DOUBLE PRECISION[],
    p_characters BIGINT[],
    p_images BIGINT[],
    p_cost BIGINT[],
    p_hold_micro_usd BIGINT[],
    p_usage_estimated BIGINT[],
    p_period_start BIGINT[],
    p_period_end BIGINT[],
    p_status TEXT[],
    p_started_at BIGINT[]
) RETURNS TABLE (
    call INTEGER,
    event_id BIGINT,
    to_budget BIGINT,
    to_credit BIGINT,
    used BIGINT,
    credited BIGINT,
    credit_used BIGINT,
    held BIGINT
)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    FOR i IN 1 .. cardinality(p_lock) LOOP
        RETURN QUERY SELECT i, s.* FROM aza_settle(
            p_lock[i], p_hold_id[i], p_budget[i], p_now[i], p_practice_id[i],
            p_subscription_id[i], p_customer_email[i], p_device_id[i], p_request_id[i],
            p_operation_type[i], p_model[i], p_input_tokens[i], p_cached_input_tokens[i],
            p_output_tokens[i], p_reasoning_tokens[i], p_total_tokens[i], p_audio_seconds[i],
            p_characters[i], p_images[i], p_cost[i], p_hold_micro_usd[i],
            p_usage_estimated[i], p_period_start[i], p_period_end[i], p_status[i],
            p_started_at[i]) AS s;
    END LOOP;
END;
$$;
