-- Ingest: events sidecars send through `POST /v1/ingest/events`, and the
-- per-token rate limit on them, shared by every API process.

-- An event whose `data` exceeded 64 KB is stored cut down (see
-- runq_shared::model::truncate_event_data) and flagged here, so truncated
-- events can be found without reading their data.
ALTER TABLE run_events ADD COLUMN truncated boolean NOT NULL DEFAULT false;
-- When the sender says the event happened (its clock); `created_at` stays
-- when runq recorded it. NULL for events workers record and for senders
-- that give none.
ALTER TABLE run_events ADD COLUMN occurred_at timestamptz;

-- The sliding window of the ingest rate limit: events accepted per token
-- (`token_key`, the SHA-256 of the bearer token) per second of the database
-- clock (`second`, Unix seconds). A request sums the token's last 60 buckets
-- under a per-token advisory lock, so API processes share one count, and
-- deletes the token's buckets that left the window: a token keeps at most 60
-- rows. No foreign key: the window outlives nothing it refers to.
CREATE TABLE ingest_usage (
    token_key  bytea NOT NULL,
    second     bigint NOT NULL,
    events     integer NOT NULL CHECK (events > 0),
    PRIMARY KEY (token_key, second)
);
