-- Autovacuum for the tables every run churns (README, "Bloat under churn").
--
-- A queue is a table whose rows all die young: each run is inserted, claimed
-- and finished (two updates that move it between partial indexes, so neither
-- is HOT), then deleted by the pruner with its steps and events, and its
-- outbox rows are deleted soon after. The server's defaults are tuned for
-- tables that mostly grow: vacuum when a fifth of the rows are dead
-- (scale factor 0.2), then crawl (cost delay 2 ms per 200 cost units). On a
-- queue that lets dead rows, and the dead index entries the claim has to
-- step over, pile up for minutes. `runq bench --phases soak` measures it.
--
-- Common to all five tables:
-- - autovacuum_vacuum_scale_factor = 0 with a fixed threshold: what the claim
--   pays for is the number of dead entries, not their share of the table. A
--   table holding a long retention of finished runs (1 h of succeeded runs,
--   24 h of failed ones) would otherwise wait for a share of all those rows
--   to die first.
-- - autovacuum_vacuum_insert_* likewise fixed: rows that are only inserted
--   (outbox, events) still get vacuumed before the bulk deletes arrive,
--   which marks their pages all-visible so later passes skip them.
-- - autovacuum_vacuum_cost_delay = 0: a pass over these tables is short
--   (most pages are recent, the rest all-visible and skipped) and the server
--   visits a database only once per autovacuum_naptime (1 min by default), so
--   a throttled pass that runs past the next visit lets two minutes of dead
--   rows build up instead of one. Unthrottled, it finishes in seconds.
--
-- What these cannot change: how often the launcher visits the database
-- (autovacuum_naptime, a server setting). Under heavy churn, lower it on the
-- server (README). Measured with 1,000,000 runs (README): before, `runs`
-- grew to 340 MB and the outbox, never vacuumed, to 1.5 GB, vacuum passes of
-- `runs` taking 20-32 s; with these, 300 MB and 830 MB at a 1 min naptime
-- (passes of 3-9 s) and a flat ~80 MB and ~210 MB at 10 s.

-- runs: ~3 dead versions per run (claim, completion, prune). fillfactor 70
-- (set when the table was created) stays: it keeps the updates on the page.
ALTER TABLE runs SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 20000,
    autovacuum_vacuum_cost_delay = 0,
    -- Statistics follow the backlog: the share of pending runs decides how
    -- the claim and the drain checks are planned.
    autovacuum_analyze_scale_factor = 0.02
);

-- run_steps: one row per step, updated at the step's checkpoint, deleted
-- with its run.
ALTER TABLE run_steps SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 20000,
    autovacuum_vacuum_cost_delay = 0
);

-- outbox: append-only, read by cursor, deleted in bulk once past retention.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 50000,
    autovacuum_vacuum_cost_delay = 0
);

-- run_events: append-only, deleted with its run or by the stored_events trim.
ALTER TABLE run_events SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 50000,
    autovacuum_vacuum_cost_delay = 0
);

-- webhook_deliveries: a few updates per delivery (pending, delivering,
-- delivered), each leaving the partial "due" index, then pruned by age.
ALTER TABLE webhook_deliveries SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 20000,
    autovacuum_vacuum_cost_delay = 0
);
