-- More room on each page of the two tables whose rows are updated in place
-- (issue 11). No update of `runs` is HOT (`status` sits in index
-- predicates), but a new row version that fits on its page costs one WAL
-- record less than one that moves (the old version's lock record), and a
-- step row updated with its output at completion (no indexed column
-- changes) stays HOT only when the output fits beside the old version.
-- Measured on a 20,000-run drain (pg_waldump): 75 % of runs updates and 72 %
-- of run_steps updates moved page at fillfactor 70 / 100; at 50 / 60 WAL per
-- run fell by ~130 bytes. The tables take ~40 % more pages while full;
-- pages written before this migration keep their packing until rewritten.
ALTER TABLE runs SET (fillfactor = 50);
ALTER TABLE run_steps SET (fillfactor = 60);
