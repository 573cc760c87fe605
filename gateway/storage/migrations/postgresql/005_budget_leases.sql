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

CREATE OR REPLACE FUNCTION aza_reserve(
    p_lock BIGINT,
    p_practice_id TEXT,
    p_usable TEXT[],
    p_period_start BIGINT,
    p_now BIGINT,
    -- the license the caller expects (all its columns) and its monthly budget
    p_subscription_id TEXT,
    p_status TEXT,
    p_lookup_key TEXT,
    p_customer_id TEXT,
    p_customer_email TEXT,
    p_license_start BIGINT,
    p_license_end BIGINT,
    p_budget BIGINT,
    -- the hold to place when admitted
    p_estimate BIGINT,
    p_hold_id TEXT,
    p_request_id TEXT,
    p_expires_at BIGINT,
    -- a lease to place instead of the estimate (0: none) when at least
    -- p_lease_floor is available (budget.snapshot.admit)
    p_lease BIGINT,
    p_lease_floor BIGINT,
    -- false: commit without waiting for the WAL flush; only for a transaction
    -- that writes nothing but holds (a gate, or a batch of gates, on its own)
    p_durable BOOLEAN
) RETURNS TABLE (
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
DECLARE
    lic RECORD;
    available BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    -- One statement, so one snapshot: a settle committing meanwhile (it holds
    -- the practice's lock, not this one) is seen whole or not at all, never
    -- its usage without its hold gone or the other way round.
    SELECT l.subscription_id, l.practice_id, l.status, l.lookup_key, l.customer_id,
           l.customer_email, l.current_period_start, l.current_period_end,
           m.used AS m_used, m.credited AS m_credited, m.credit_used AS m_credit_used,
           m.held AS m_held
      INTO lic
      FROM aza_money(p_practice_id, p_period_start, p_now) AS m
      LEFT JOIN LATERAL (
            SELECT * FROM licenses AS x
             WHERE x.practice_id = p_practice_id
             ORDER BY CASE WHEN x.status = ANY (p_usable) THEN 0 ELSE 1 END,
                      x.current_period_end DESC
             LIMIT 1) AS l ON true;
    subscription_id := lic.subscription_id;
    practice_id := lic.practice_id;
    status := lic.status;
    lookup_key := lic.lookup_key;
    customer_id := lic.customer_id;
    customer_email := lic.customer_email;
    current_period_start := lic.current_period_start;
    current_period_end := lic.current_period_end;
    used := lic.m_used;
    credited := lic.m_credited;
    credit_used := lic.m_credit_used;
    held := lic.m_held;
    hold_micro_usd := NULL;
    IF lic.subscription_id IS NOT DISTINCT FROM p_subscription_id
       AND lic.status IS NOT DISTINCT FROM p_status
       AND lic.lookup_key IS NOT DISTINCT FROM p_lookup_key
       AND lic.customer_id IS NOT DISTINCT FROM p_customer_id
       AND lic.customer_email IS NOT DISTINCT FROM p_customer_email
       AND lic.current_period_start IS NOT DISTINCT FROM p_license_start
       AND lic.current_period_end IS NOT DISTINCT FROM p_license_end
    THEN
        -- budget.snapshot.admit: remaining (never below 0) + extra credit - holds.
        available := GREATEST(0, p_budget - used) + (credited - credit_used) - held;
        IF available > 0 THEN
            IF p_lease > p_estimate AND available >= p_lease_floor THEN
                hold_micro_usd := p_lease;
            ELSE
                hold_micro_usd := GREATEST(1, LEAST(p_estimate, available));
            END IF;
            INSERT INTO ai_budget_holds (hold_id, practice_id, request_id, amount_micro_usd,
                                         created_at, expires_at)
            VALUES (p_hold_id, p_practice_id, p_request_id, hold_micro_usd, p_now, p_expires_at);
            IF NOT p_durable THEN
                -- A hold is not money: a server crash that loses it loses no
                -- usage (the settle writes its event all the same) and nothing
                -- else is written here. Not waiting for the flush takes ~0.12 ms
                -- off the request and off the time the practice's lock is held.
                PERFORM set_config('synchronous_commit', 'off', true);
            END IF;
        END IF;
    END IF;
    RETURN NEXT;
END;
$$;

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

CREATE OR REPLACE FUNCTION aza_settle(
    p_lock BIGINT,
    p_hold_id TEXT,
    p_budget BIGINT,
    p_now BIGINT,
    -- the usage event (ai_usage_events' columns, in its order)
    p_practice_id TEXT,
    p_subscription_id TEXT,
    p_customer_email TEXT,
    p_device_id TEXT,
    p_request_id TEXT,
    p_operation_type TEXT,
    p_model TEXT,
    p_input_tokens BIGINT,
    p_cached_input_tokens BIGINT,
    p_output_tokens BIGINT,
    p_reasoning_tokens BIGINT,
    p_total_tokens BIGINT,
    p_audio_seconds DOUBLE PRECISION,
    p_characters BIGINT,
    p_images BIGINT,
    p_cost BIGINT,
    p_hold_micro_usd BIGINT,
    p_usage_estimated BIGINT,
    p_period_start BIGINT,
    p_period_end BIGINT,
    p_status TEXT,
    p_started_at BIGINT
) RETURNS TABLE (
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
    PERFORM pg_advisory_xact_lock(p_lock);
    -- The request's part of its hold: the whole hold, or its share of a
    -- lease (p_hold_micro_usd of it). Taken once: not when this request was
    -- settled before (its event exists; settles of a practice are
    -- serialised by the lock above, so no other settle of it is under way).
    IF NOT EXISTS (SELECT 1 FROM ai_usage_events AS e WHERE e.request_id = p_request_id) THEN
        DELETE FROM ai_budget_holds AS h
         WHERE h.practice_id = p_practice_id AND h.hold_id = p_hold_id
           AND h.amount_micro_usd <= p_hold_micro_usd;
        IF NOT FOUND THEN
            UPDATE ai_budget_holds AS h SET amount_micro_usd = h.amount_micro_usd - p_hold_micro_usd
             WHERE h.practice_id = p_practice_id AND h.hold_id = p_hold_id;
        END IF;
    END IF;
    SELECT m.used, m.credited, m.credit_used, m.held INTO used, credited, credit_used, held
      FROM aza_money(p_practice_id, p_period_start, p_now) AS m;
    -- budget.snapshot.split_charge: the monthly budget first, the rest from credit.
    to_budget := LEAST(p_cost, GREATEST(0, p_budget - used));
    to_credit := p_cost - to_budget;
    INSERT INTO ai_usage_events (practice_id, subscription_id, customer_email, device_id,
        request_id, operation_type, model, input_tokens, cached_input_tokens, output_tokens,
        reasoning_tokens, total_tokens, audio_seconds, characters, images,
        estimated_cost_micro_usd, charged_budget_micro_usd, charged_credit_micro_usd,
        hold_micro_usd, usage_estimated, period_start, period_end, status, started_at,
        created_at)
    VALUES (p_practice_id, p_subscription_id, p_customer_email, p_device_id,
        p_request_id, p_operation_type, p_model, p_input_tokens, p_cached_input_tokens,
        p_output_tokens, p_reasoning_tokens, p_total_tokens, p_audio_seconds, p_characters,
        p_images, p_cost, to_budget, to_credit, p_hold_micro_usd, p_usage_estimated,
        p_period_start, p_period_end, p_status, p_started_at, p_now)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING id INTO event_id;
    IF event_id IS NULL THEN
        -- Settled before: nothing charged now.
        to_budget := 0;
        to_credit := 0;
    ELSE
        INSERT INTO ai_usage_period_totals AS t (practice_id, period_start, used_micro_usd,
                                                 used_credit_micro_usd, events)
        VALUES (p_practice_id, p_period_start, p_cost, to_credit, 1)
        ON CONFLICT (practice_id, period_start) DO UPDATE SET
            used_micro_usd = t.used_micro_usd + excluded.used_micro_usd,
            used_credit_micro_usd = t.used_credit_micro_usd + excluded.used_credit_micro_usd,
            events = t.events + 1;
    END IF;
    RETURN NEXT;
END;
$$;
