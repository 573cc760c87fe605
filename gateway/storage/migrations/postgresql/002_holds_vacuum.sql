-- Holds are inserted and deleted once per request, so the table is nearly
-- empty but collects a dead tuple per request until autovacuum runs; by
-- default that waits for 20% of the table plus 50 rows to be dead, which a
-- table this small reaches only by row count, and the gate's per-practice sum
-- then wades through the dead tuples. Vacuum it after every 1,000 dead rows.

ALTER TABLE ai_budget_holds SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);

