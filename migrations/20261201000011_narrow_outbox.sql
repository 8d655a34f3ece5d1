-- Narrow outbox rows (issue 11; docs/adr/0004, "Narrow rows").
--
-- Each state change of a run wrote its event as jsonb built by
-- runq_event_payload: ~370 bytes per row, three rows per run, half of all
-- the WAL a run's life wrote, and mostly the row's own columns again
-- (tenant, run id, type, time) spelled out as JSON keys and text. Rows now
-- store the run's fields as typed columns (~140 bytes a row) and the event
-- is built when it is read, by runq_outbox_event, into the same JSON as
-- before: readers and the contract do not change.
--
-- In place: rows written before this migration keep their `payload`, and
-- runq_outbox_event returns it as it is; new rows leave it null.
ALTER TABLE outbox
    ALTER COLUMN payload DROP NOT NULL,
    ADD COLUMN queue text,
    ADD COLUMN status run_status,
    ADD COLUMN attempt integer,
    ADD COLUMN max_attempts integer,
    ADD COLUMN run_at timestamptz,
    ADD COLUMN error jsonb,
    ADD COLUMN result jsonb;

-- The event of outbox row `o`, as runq_shared::OutboxEvent reads it:
-- `occurred_at` is the row's `created_at` (both were the writing
-- transaction's now()).
CREATE FUNCTION runq_outbox_event(o outbox) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(o.payload, jsonb_build_object(
        'type', o.event_type,
        'occurred_at', o.created_at,
        'run', jsonb_build_object(
            'id', o.run_id, 'tenant_id', o.tenant_id, 'queue', o.queue, 'status', o.status,
            'attempt', o.attempt, 'max_attempts', o.max_attempts, 'run_at', o.run_at,
            'error', o.error, 'result', o.result)))
$$;

-- Every writer now fills the columns above; the builder of the old payload
-- has no caller left.
DROP FUNCTION runq_event_payload(text, runs);
