-- Batches (issue 16), continued.
--
-- intent_id: a batch is recorded, with its hold, *before* the upstream is
-- asked to create it; until the upstream's answer names the batch, its row
-- has batch_id = intent_id and status 'creating', and the same id travels
-- in the batch's metadata (aza_intent), so that after a crash in between a
-- follower finds the batch upstream by it (or, when none was made,
-- releases the hold).
-- device_id: the X-Device-Id of the request that created it (its lines'
-- usage events carry it). cap_hold_id, cap_key, cap_device: the hold placed
-- on the monthly caps of the creating key and device (issue 18) and which
-- of them were capped (the key's prefix, the device id), charged with the
-- batch's cost when it is settled.
ALTER TABLE aza_batches ADD COLUMN intent_id TEXT;
ALTER TABLE aza_batches ADD COLUMN device_id TEXT;
ALTER TABLE aza_batches ADD COLUMN cap_hold_id TEXT;
ALTER TABLE aza_batches ADD COLUMN cap_key TEXT;
ALTER TABLE aza_batches ADD COLUMN cap_device TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS aza_batches_intent ON aza_batches (intent_id);
-- The usage views list a period's batches by when they were settled.
CREATE INDEX IF NOT EXISTS aza_batches_by_settled ON aza_batches (practice_id, settled_at);
