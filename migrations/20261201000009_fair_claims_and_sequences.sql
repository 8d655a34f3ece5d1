-- Fair claims between tenants and sequence keys (README, "Fairness between
-- tenants" and "Sequence keys"; docs/adr/0006-fair-claims-and-sequences.md).

-- A run may carry a sequence key: runs of one tenant with the same key run
-- one at a time, in enqueue order. `sequence_waiting` is true while a keyed
-- run waits for the run ahead of it; such a run is `pending` but absent from
-- the claim index, so a long line behind one key costs a claim nothing.
ALTER TABLE runs
    ADD COLUMN sequence_key text,
    ADD COLUMN sequence_waiting boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT runs_sequence_waiting_keyed
        CHECK (NOT sequence_waiting OR sequence_key IS NOT NULL);

-- The claim index gains `tenant_id` after the priority: a claim walks the
-- distinct (priority, tenant) groups of a queue with a few index probes and
-- takes round-robin from each group's head, FIFO inside a group. It replaces
-- the old index rather than joining it, so a run still costs one entry here.
DROP INDEX runs_pending_idx;
CREATE INDEX runs_pending_idx ON runs (queue, priority DESC, tenant_id, run_at, id)
    WHERE status = 'pending' AND NOT sequence_waiting;

-- The next run of a key, oldest first: what the promoter unblocks.
CREATE INDEX runs_sequence_waiting_idx ON runs (tenant_id, sequence_key, id)
    WHERE sequence_waiting AND status = 'pending';

-- The key's holder: the one keyed run that is not waiting and has not let go
-- of its key (a failed or stopped run keeps it until it succeeds after a
-- retry or is cancelled). At most one per key, enforced here as a last line
-- behind the promoter's own check.
CREATE UNIQUE INDEX runs_sequence_holder_idx ON runs (tenant_id, sequence_key)
    WHERE sequence_key IS NOT NULL AND NOT sequence_waiting
      AND status IN ('pending', 'running', 'failed', 'stopped_quota');

-- Keys that may have a run to unblock: written in the transaction that
-- enqueues a keyed run, releases a key or brings a cancelled keyed run back,
-- and drained by the workers' promoter, which alone takes runs out of
-- `sequence_waiting` (under a per-key advisory lock).
CREATE TABLE sequence_wakeups (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id     uuid NOT NULL,
    sequence_key  text NOT NULL
);

CREATE FUNCTION runq_sequence_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sequence_wakeups (tenant_id, sequence_key)
    VALUES (NEW.tenant_id, NEW.sequence_key);
    PERFORM pg_notify('runq_sequence', '');
    RETURN NULL;
END
$$;

-- The statements that set `sequence_waiting` do so themselves (enqueue:
-- every keyed run waits; retry: a cancelled keyed run waits again; cancel:
-- a run cancelled while waiting no longer waits). The triggers only write
-- the wakeups, and only for keyed rows: their WHEN clauses are all a
-- keyless run's claim and completion pay.
CREATE TRIGGER runs_sequence_entered AFTER INSERT ON runs
    FOR EACH ROW WHEN (NEW.sequence_key IS NOT NULL)
    EXECUTE FUNCTION runq_sequence_wake();
-- The holder let go of its key (succeeded, or cancelled), or a cancelled
-- keyed run came back to pending behind its key.
CREATE TRIGGER runs_sequence_changed AFTER UPDATE OF status ON runs
    FOR EACH ROW WHEN (NEW.sequence_key IS NOT NULL AND OLD.status <> NEW.status
                       AND (NEW.status IN ('succeeded', 'cancelled')
                            OR (OLD.status = 'cancelled' AND NEW.status = 'pending')))
    EXECUTE FUNCTION runq_sequence_wake();

-- Takes the promoter's per-key advisory locks in one global order, so two
-- promoters never wait on each other in a cycle. Nothing else takes them.
CREATE FUNCTION runq_sequence_lock(tenants uuid[], keys text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    k integer;
BEGIN
    FOR k IN
        SELECT DISTINCT hashtext(t.tenant_id::text || '/' || t.sequence_key) AS h
        FROM unnest(tenants, keys) AS t(tenant_id, sequence_key)
        ORDER BY h
    LOOP
        -- 0x73657173, "seqs": the sequence keys' lock space.
        PERFORM pg_advisory_xact_lock(1936027763, k);
    END LOOP;
END
$$;
