-- The outbox becomes an append-only log read by cursor, and webhooks are
-- delivered from it (docs/adr/0004-outbox-cursor-and-webhooks.md).
--
-- 1. No per-row update and no per-row index entry for delivery: the
--    `delivered_at` column and its partial index go. Consumers keep a cursor
--    instead: the relay one row in `outbox_cursors`, a stream client the
--    `Last-Event-ID` it last saw.
ALTER TABLE outbox DROP COLUMN delivered_at;

-- 2. The order a cursor walks is the writing transaction's id, then the row
--    id. Identity values are handed out at insert, not at commit, so a row
--    with a lower id can become visible after a higher one; a reader that
--    advanced past it would never see it. A reader instead takes only rows
--    whose transaction is older than every transaction still running
--    (`txid < pg_snapshot_xmin(pg_current_snapshot())`): those transactions
--    have all ended, so nothing can appear behind the cursor any more (the
--    technique of PgQ). The primary key is that order, so the log has two
--    index entries per row, as before this change minus the delivery index.
ALTER TABLE outbox ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();
ALTER TABLE outbox DROP CONSTRAINT outbox_pkey;
ALTER TABLE outbox ADD PRIMARY KEY (txid, id);

-- One cursor per consumer of the whole log: the row is locked while a relay
-- advances it (`FOR UPDATE SKIP LOCKED`), so relays on many workers take
-- turns and none is special. Starts at the beginning: with no subscription
-- yet, catching up only moves the cursor.
CREATE TABLE outbox_cursors (
    name        text PRIMARY KEY,
    txid        xid8 NOT NULL,
    id          bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO outbox_cursors (name, txid, id) VALUES ('webhooks', '0', 0);

-- A tenant's webhook subscription. The secret is the Standard Webhooks key
-- (`whsec_` + base64), kept in plaintext because signing needs it; the API
-- shows it once, at creation. `topics` empty means every event type.
CREATE TABLE webhooks (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url         text NOT NULL,
    topics      text[] NOT NULL DEFAULT '{}',
    description text,
    secret      text NOT NULL,
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhooks_tenant_idx ON webhooks (tenant_id, id);

-- pending: waiting for its next attempt (or, behind an earlier event of the
--   same run, for that one to finish);
-- delivering: a relay is sending it; `next_attempt_at` is the end of its
--   lease, after which another relay may take it again (the sender died);
-- delivered: a 2xx reply;
-- dead: no attempts left. Visible through the API; redelivery makes it pending.
CREATE TYPE delivery_state AS ENUM ('pending', 'delivering', 'delivered', 'dead');

-- One event for one subscription. Written by the relay when it moves the
-- cursor past the event, in the same transaction, so an event is fanned out
-- exactly once per subscription (the unique key makes a repeat a no-op).
-- `attempts` only grows (redelivery raises `attempts_allowed` instead), so a
-- sender's write is fenced on it like a run's on its lease token.
CREATE TABLE webhook_deliveries (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id        uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    tenant_id         uuid NOT NULL,
    run_id            uuid NOT NULL,
    event_id          bigint NOT NULL,
    event_type        text NOT NULL,
    payload           jsonb NOT NULL,
    state             delivery_state NOT NULL DEFAULT 'pending',
    attempts          integer NOT NULL DEFAULT 0,
    attempts_allowed  integer NOT NULL CHECK (attempts_allowed > 0),
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    created_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    UNIQUE (webhook_id, event_id)
);
-- What is due: pending rows whose time came, delivering rows whose lease ended.
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at)
    WHERE state IN ('pending', 'delivering');
-- Order per run: a delivery waits while an earlier event of its run is
-- unfinished for the same subscription.
CREATE INDEX webhook_deliveries_open_idx ON webhook_deliveries (webhook_id, run_id, event_id)
    WHERE state IN ('pending', 'delivering');
-- Pruning finished deliveries by age.
CREATE INDEX webhook_deliveries_finished_idx ON webhook_deliveries (finished_at)
    WHERE finished_at IS NOT NULL;

-- Every attempt of a delivery: when, how long, the reply's status or why
-- there was none.
CREATE TABLE webhook_attempts (
    delivery_id  bigint NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    started_at   timestamptz NOT NULL,
    duration_ms  integer NOT NULL,
    status_code  integer,
    error        text,
    PRIMARY KEY (delivery_id, attempt)
);
