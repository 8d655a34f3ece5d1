-- Hardening the core (docs/adr/0001-lease-token.md).
--
-- 1. A lease token that only grows over a run's whole life. Every claim takes a
--    new one and every move out of `running` (completion, rescue, hand-back)
--    takes another, so `(id, lease_token)` names exactly one lease: a worker's
--    write fenced on it matches only while that lease is the run's current one.
--    `attempt` resets on retry and is no fence.
ALTER TABLE runs ADD COLUMN lease_token bigint NOT NULL DEFAULT 0;

-- 2. Attempt history: one object per attempt that ended without success
--    (attempt, at, reason, message, position, worker_id), oldest first. NULL
--    until the first failure, so a run that succeeds at once stores nothing.
ALTER TABLE runs ADD COLUMN errors jsonb;

-- 3. A digest of the request that created a run with an idempotency key, so a
--    repeated key with a different request is refused instead of answered
--    with the earlier run.
ALTER TABLE runs ADD COLUMN idempotency_hash bytea;

-- 4. A cancel request only lives while the run executes: every path out of
--    `running` turns a requested cancel into `cancelled`, so no pending run
--    can carry one and a claim never hands out a run someone cancelled.
ALTER TABLE runs ADD CONSTRAINT runs_cancel_request_only_while_running
    CHECK (NOT (cancel_requested AND status = 'pending'));

-- The outbox payload, from the run row itself: every statement that changes a
-- run's state passes the changed row (`changed::runs`) and the event type.
DROP FUNCTION runq_event_payload(text, uuid, uuid, text, run_status, integer, integer,
                                 timestamptz, jsonb, jsonb);
CREATE FUNCTION runq_event_payload(event_type text, r runs)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'type', event_type,
        'occurred_at', now(),
        'run', jsonb_build_object(
            'id', r.id, 'tenant_id', r.tenant_id, 'queue', r.queue, 'status', r.status,
            'attempt', r.attempt, 'max_attempts', r.max_attempts, 'run_at', r.run_at,
            'error', r.error, 'result', r.result))
$$;

-- The attempt history `errors` with one more entry: attempt `attempt`, held
-- by `worker`, ended now with `error`. (Columns, not the whole row: a
-- whole-row argument makes every call copy the row.)
CREATE FUNCTION runq_attempt_error(errors jsonb, attempt integer, worker uuid, error jsonb)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(errors, '[]'::jsonb) || jsonb_build_array(
        jsonb_build_object('attempt', attempt, 'at', now(), 'worker_id', worker)
        || coalesce(error, '{}'::jsonb))
$$;

-- The status an attempt's end leaves a run in: `outcome` is `succeeded`,
-- `stopped`, `cancelled` or `failed` (a failed step, an expired lease, a crash).
-- A cancel requested while the attempt ran wins over a retry, so a run with a
-- cancel request never goes back to pending. The one place this rule lives:
-- the completer, the rescuer and the graceful hand-back all use it.
CREATE FUNCTION runq_outcome_status(outcome text, cancel_requested boolean,
                                    attempt integer, max_attempts integer)
RETURNS run_status LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN outcome = 'succeeded' THEN 'succeeded'::run_status
        WHEN outcome = 'stopped' THEN 'stopped_quota'::run_status
        WHEN outcome = 'cancelled' OR cancel_requested THEN 'cancelled'::run_status
        WHEN outcome = 'released' OR attempt < max_attempts THEN 'pending'::run_status
        ELSE 'failed'::run_status END
$$;

-- The outbox event type of each status an attempt's end can leave.
CREATE FUNCTION runq_outcome_event(status run_status, outcome text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE status
        WHEN 'succeeded' THEN 'run.succeeded'
        WHEN 'pending' THEN CASE WHEN outcome = 'released' THEN 'run.released'
                                 ELSE 'run.retrying' END
        WHEN 'failed' THEN 'run.failed'
        WHEN 'stopped_quota' THEN 'run.stopped'
        ELSE 'run.cancelled' END
$$;

-- Why the rescuer ended a run's attempt: its worker's lease expired, or, for a
-- run a client had asked to cancel, the cancel (the rescuer completes it).
CREATE FUNCTION runq_rescue_error(r runs)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN r.cancel_requested THEN jsonb_build_object(
                    'reason', 'cancelled',
                    'message', format('cancelled by a client; the lease of worker %s expired at %s',
                                      r.locked_by, r.lease_expires_at))
                ELSE jsonb_build_object(
                    'reason', 'lease_expired',
                    'message', format('the lease of worker %s expired at %s',
                                      r.locked_by, r.lease_expires_at)) END
$$;
