-- One PostgreSQL function, defined here only; migrations apply it with
-- CREATE OR REPLACE (`\ir ../../functions/<name>.sql`, gateway/storage/__init__.py).
--
-- The settle as one statement: the request's hold (or its share of a
-- lease) off, the usage event in, the charge split budget first then
-- credit (budget.snapshot.split_charge), the period totals grown.

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
