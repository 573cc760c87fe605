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

\ir ../../functions/aza_money.sql
\ir ../../functions/aza_reserve.sql
\ir ../../functions/aza_settle.sql
\ir ../../functions/aza_reserve_many.sql
\ir ../../functions/aza_settle_many.sql
