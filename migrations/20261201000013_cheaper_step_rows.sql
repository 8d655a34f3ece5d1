-- Cheaper step rows (issue 11). Measured with pg_waldump over a 20,000-run
-- drain at c=50 (README, "Performance"):
--
-- 1. The foreign key from run_steps to runs checked every inserted step by
--    locking its run FOR KEY SHARE: one WAL record (~54 bytes) and one
--    row-by-row trigger call per step at enqueue. Step rows are only ever
--    inserted by the statement that inserts their run (enqueue), so the key
--    can never point nowhere; what the constraint still gave was the cascade
--    when a run is deleted (pruning, or a tenant deleted with its runs).
--    A statement-level trigger keeps that cascade, one set-based DELETE per
--    statement instead of one lock per inserted step. run_events keeps its
--    foreign key: events are inserted by sidecars too, whose run may be
--    pruned meanwhile.
--
-- 2. A completion updates ~40 runs at once, and consecutive runs' step rows
--    share a page: at fillfactor 60, 42 % of those updates found no room on
--    the page and moved (a non-HOT update: a new primary-key entry, plus a
--    lock record on the old version). Each new version needs about as much
--    room as the old one, so a page must stay under half full for every row
--    on it to be updated in place: at 40, every step update of that drain
--    was HOT, and WAL per run fell by ~110 bytes. The table takes half as
--    many pages again while full; pages already written keep their packing.
ALTER TABLE run_steps DROP CONSTRAINT run_steps_run_id_fkey;

CREATE FUNCTION runq_runs_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM run_steps s USING gone g WHERE s.run_id = g.id;
    RETURN NULL;
END
$$;

-- Fires for every statement that deletes runs, those of a cascade from
-- tenants included.
CREATE TRIGGER runs_deleted AFTER DELETE ON runs
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION runq_runs_deleted();

ALTER TABLE run_steps SET (fillfactor = 40);
