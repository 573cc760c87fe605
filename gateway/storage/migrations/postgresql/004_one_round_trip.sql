-- The gate and the settle in one round trip each (PostgreSQL only).
--
-- A proxied request's metering took ten round trips on its own: BEGIN with
-- the practice's advisory lock, the state read, the hold insert and COMMIT;
-- then BEGIN with the lock, the hold delete, the money read, the usage event,
-- the period totals and COMMIT. Each costs the gateway ~60 µs of CPU and the
-- request a loopback wait. These functions do the same statements, in the
-- same order, under the same advisory lock, as one statement: called outside
-- a transaction, each is its own transaction, committed when it returns.
-- Under load the gateway sends the gates (or settles) of one practice that
-- queued while one was under way as one statement (the *_many functions
-- below): one round trip and one COMMIT for all of them.
--
-- Locks (advisory, passed in as p_lock):
-- * aza_settle takes the practice's lock, as every other transaction on the
--   practice does: settles are serialised, so each splits its cost against
--   the monthly budget the others used before it.
-- * aza_reserve takes the practice's gate lock (another key): gates are
--   serialised among themselves, so none can hold money another gate has
--   just held (the check-then-hold race). A gate does not wait for a settle
--   in flight, whose COMMIT waits for its WAL flush (at low load the next
--   request's gate always met the last one's settle: ~0.3 ms of its
--   latency). It reads the license and the money in ONE statement, so one
--   snapshot, and sees a concurrent settle whole (usage in, hold gone) or
--   not at all (hold still there): either is a true state, the one it would
--   have seen a moment earlier or later. The gate's transaction fallback
--   takes both locks, the practice's first; nothing takes them in the other
--   order, so they cannot deadlock.
-- Inside a (volatile) PL/pgSQL function every statement takes a new snapshot
-- under READ COMMITTED, so the reads after a lock see everything committed
-- before it was granted.
--
-- The gateway's Python code stays the judge (gateway/storage/one_call.py):
-- aza_reserve places a hold only for the license and period the caller saw
-- last time (passed in) and with the arithmetic of budget.snapshot.admit;
-- the caller checks the returned state with the Python rules and, when they
-- disagree (a renewal, a new month, an expired license), takes the hold
-- back and runs the ordinary transaction instead.

-- A practice's money at one moment: this period's usage, extra credit bought
-- and used, holds in flight (the gate's and the settle's read; micro-USD).
CREATE OR REPLACE FUNCTION aza_money(p_practice_id TEXT, p_period_start BIGINT, p_now BIGINT)
RETURNS TABLE (used BIGINT, credited BIGINT, credit_used BIGINT, held BIGINT)
LANGUAGE sql STABLE AS $$
    SELECT
        (SELECT COALESCE(SUM(t.used_micro_usd), 0) FROM ai_usage_period_totals AS t
          WHERE t.practice_id = p_practice_id AND t.period_start = p_period_start)::BIGINT,
        (SELECT COALESCE(SUM(c.amount_internal_micro_usd), 0) FROM ai_credit_ledger AS c
          WHERE c.practice_id = p_practice_id AND c.status = 'succeeded')::BIGINT,
        (SELECT COALESCE(SUM(t.used_credit_micro_usd), 0) FROM ai_usage_period_totals AS t
          WHERE t.practice_id = p_practice_id)::BIGINT,
        (SELECT COALESCE(SUM(h.amount_micro_usd), 0) FROM ai_budget_holds AS h
          WHERE h.practice_id = p_practice_id AND h.expires_at > p_now)::BIGINT
$$;

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
            hold_micro_usd := GREATEST(1, LEAST(p_estimate, available));
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
    DELETE FROM ai_budget_holds AS h
     WHERE h.practice_id = p_practice_id AND h.hold_id = p_hold_id;
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

-- Several gates or several settles of one practice as one statement: the
-- calls one after another, in the order given, in one transaction (one
-- COMMIT, one WAL flush for all). Each call sees the ones before it, as if
-- each had waited for the one before on the practice's lock. Parameters are
-- the single call's, one array element per call (p_usable and p_durable are
-- the same for all); `call` numbers the answers from 1.

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
    p_expires_at BIGINT[]
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
            p_estimate[i], p_hold_id[i], p_request_id[i], p_expires_at[i], p_durable) AS r;
    END LOOP;
END;
$$;

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
