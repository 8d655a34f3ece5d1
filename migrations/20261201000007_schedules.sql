-- Cron schedules (README, "Schedules"): a 5-field cron expression in a time
-- zone and a run template. Workers fire due schedules under `FOR UPDATE SKIP
-- LOCKED`, enqueueing the run with the idempotency key
-- `schedule:<id>:<tick>` in the same transaction that moves `next_fire_at`
-- on, so each tick makes exactly one run however many workers look and
-- whichever of them restarts.
CREATE TABLE schedules (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name           text NOT NULL,
    cron           text NOT NULL,
    timezone       text NOT NULL,
    template       jsonb NOT NULL,
    enabled        boolean NOT NULL DEFAULT true,
    next_fire_at   timestamptz NOT NULL,
    last_fired_at  timestamptz,
    last_run_id    uuid,
    last_error     text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
-- What is due: the scheduler's scan.
CREATE INDEX schedules_due_idx ON schedules (next_fire_at) WHERE enabled;
