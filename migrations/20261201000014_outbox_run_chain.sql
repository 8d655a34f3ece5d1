-- A run's outbox rows found without an index of their own (issue 11).
--
-- `outbox_run_idx (run_id)` was written for every outbox row (three per run:
-- ~240 bytes of WAL and three index inserts per run in a 20,000-run drain)
-- for one reader: a run's live stream and `outbox::for_run`, which read one
-- run's rows. They now follow a chain instead:
--
-- - every statement that changes a run's state and writes its outbox row
--   also sets `runs.last_event_txid` to its own transaction id, keeping the
--   value it replaces in `runs.prev_event_txid`, and copies that previous
--   value into the outbox row (`outbox.prev_txid`). `prev_event_txid` is
--   only there to carry the old value out of the UPDATE: PostgreSQL 15's
--   RETURNING sees the new row alone;
-- - a reader starts at `runs.last_event_txid` and walks `prev_txid` back,
--   each step one range of the primary key `(txid, id)`: the rows of one
--   transaction, filtered by run (`runq_run_outbox`).
--
-- A run's outbox rows are written by transactions that hold the run's row
-- lock until commit, so the chain is in commit order and ids grow along it:
-- the walk stops at the first transaction whose rows are all at or below the
-- id the reader has seen.
--
-- Rows written before this migration have no chain: `chained` is NULL for
-- them (and true for every later row), and a partial index keeps finding
-- them by run. It takes no new entries.
ALTER TABLE runs ADD COLUMN last_event_txid xid8, ADD COLUMN prev_event_txid xid8;
ALTER TABLE outbox ADD COLUMN prev_txid xid8, ADD COLUMN chained boolean;
ALTER TABLE outbox ALTER COLUMN chained SET DEFAULT true;
CREATE INDEX outbox_run_legacy_idx ON outbox (run_id, id) WHERE chained IS NULL;
DROP INDEX outbox_run_idx;

-- The outbox rows of run `run` with ids above `after`, `head` being the
-- run's `last_event_txid`, in no particular order.
CREATE FUNCTION runq_run_outbox(run uuid, head xid8, after bigint)
RETURNS SETOF outbox LANGUAGE sql STABLE AS $$
    WITH RECURSIVE chain (txid) AS (
        SELECT head WHERE head IS NOT NULL
        UNION ALL
        SELECT p.prev_txid
        FROM chain c
        CROSS JOIN LATERAL (
            -- A transaction that wrote two rows of the run links the second
            -- to itself; the first carries the link further back.
            SELECT o.prev_txid FROM outbox o
            WHERE o.txid = c.txid AND o.run_id = run
              AND o.prev_txid IS DISTINCT FROM c.txid
            ORDER BY o.id LIMIT 1
        ) p
        WHERE p.prev_txid IS NOT NULL
          -- Older transactions only hold older rows: once this one holds
          -- none above `after`, neither do they.
          AND EXISTS (SELECT 1 FROM outbox o
                      WHERE o.txid = c.txid AND o.run_id = run AND o.id > after)
    )
    SELECT o.* FROM chain c
    JOIN outbox o ON o.txid = c.txid AND o.run_id = run AND o.id > after
    UNION ALL
    SELECT o.* FROM outbox o
    WHERE o.run_id = run AND o.chained IS NULL AND o.id > after
$$;
