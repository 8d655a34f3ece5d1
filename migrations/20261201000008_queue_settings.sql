-- Settings of named queues (README, "Queues and workers"): a pause flag, a
-- fleet-wide concurrency limit and a fleet-wide start rate. A queue without
-- a row has none of them, and its claims are the plain claim of DESIGN.md.
-- A limited queue is claimed under its row's lock, so two workers cannot
-- both take its last slot or its last token; `tokens`/`refilled_at` are
-- its rate limit's bucket (at most one second's worth).
CREATE TABLE queues (
    name             text PRIMARY KEY,
    paused           boolean NOT NULL DEFAULT false,
    concurrency      integer CHECK (concurrency > 0),
    rate_per_second  double precision CHECK (rate_per_second > 0),
    tokens           double precision NOT NULL DEFAULT 0,
    refilled_at      timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
