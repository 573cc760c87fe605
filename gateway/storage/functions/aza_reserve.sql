-- One PostgreSQL function, defined here only; migrations apply it with
-- CREATE OR REPLACE (`\ir ../../functions/<name>.sql`, gateway/storage/__init__.py).
--
-- The gate as one statement (see migration 004 for the locks, and
-- gateway/storage/one_call.py for how the gateway judges its answer): reads
-- the license and the money in one snapshot and places the hold, or a lease
-- (p_lease, while p_lease_floor is available), by budget.snapshot.admit's rule.

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
