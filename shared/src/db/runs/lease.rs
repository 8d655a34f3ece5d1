//! Leases after the claim: heartbeats extend them, a stopping worker hands its
//! runs back, and the rescuer takes back runs whose lease expired.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::DbError;
use crate::model::RunId;
use crate::protocol::{Backoff, HeldRun, Lease};

/// The leases as id and token columns for `unnest`. Every statement here
/// also filters `r.id = ANY(ids)`, so runs are reached through the primary
/// key rather than by hashing the input against a scan of every run.
fn columns(leases: &[Lease]) -> (Vec<Uuid>, Vec<i64>) {
    let mut sorted: Vec<Lease> = leases.to_vec();
    // Sorted by id so concurrent writers lock rows in the same order.
    sorted.sort_by_key(|l| l.id);
    sorted.iter().map(|l| (l.id, l.token)).unzip()
}

/// Extends every lease in `leases` that is still current by `lease_ms`, in
/// one statement. Runs missing from the answer were taken away: drop them.
/// Runs locked right now by the worker's own completer are reported held but
/// not extended (`extended: false`): the heartbeat never waits on a lock, so
/// it can never be part of a deadlock, and those runs are about to finish.
///
/// # Errors
///
/// Database errors.
pub async fn extend_leases(
    conn: &mut PgConnection,
    leases: &[Lease],
    lease_ms: i64,
) -> Result<Vec<HeldRun>, DbError> {
    let (ids, tokens) = columns(leases);
    Ok(sqlx::query_as!(
        HeldRun,
        r#"
        WITH free AS (
            SELECT r.id
            FROM unnest($1::uuid[], $2::int8[]) AS i(id, token)
            JOIN runs r ON r.id = i.id AND r.lease_token = i.token
            WHERE r.id = ANY($1::uuid[])
            FOR UPDATE OF r SKIP LOCKED
        ), extended AS (
            UPDATE runs r SET lease_expires_at = now() + $3 * interval '1 millisecond'
            WHERE r.id = ANY(ARRAY(SELECT id FROM free))
            RETURNING r.id
        )
        SELECT r.id AS "id!", r.cancel_requested AS "cancel_requested!",
               r.id = ANY(ARRAY(SELECT id FROM extended)) AS "extended!"
        FROM unnest($1::uuid[], $2::int8[]) AS i(id, token)
        JOIN runs r ON r.id = i.id AND r.lease_token = i.token
        WHERE r.id = ANY($1::uuid[])
        "#,
        &ids,
        &tokens,
        lease_ms as f64,
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Hands runs back to pending without charging the attempt (graceful
/// shutdown), with a `run.released` outbox row each; a run whose cancel was
/// requested ends `cancelled` instead (`run.cancelled`).
///
/// # Errors
///
/// Database errors.
pub async fn release_many(
    conn: &mut PgConnection,
    leases: &[Lease],
) -> Result<Vec<RunId>, DbError> {
    let (ids, tokens) = columns(leases);
    Ok(sqlx::query_scalar!(
        r#"
        WITH released AS (
            UPDATE runs r
            SET status = runq_outcome_status(
                    'released', r.cancel_requested, r.attempt, r.max_attempts),
                attempt = CASE WHEN r.cancel_requested THEN r.attempt ELSE r.attempt - 1 END,
                run_at = CASE WHEN r.cancel_requested THEN r.run_at ELSE now() END,
                started_at = CASE WHEN r.cancel_requested THEN r.started_at END,
                finished_at = CASE WHEN r.cancel_requested THEN now() END,
                error = CASE WHEN r.cancel_requested
                             THEN '{"reason": "cancelled", "message": "cancelled by a client"}'
                             ELSE r.error END,
                locked_by = NULL, lease_expires_at = NULL, lease_token = r.lease_token + 1,
                prev_event_txid = r.last_event_txid, last_event_txid = pg_current_xact_id()
            FROM unnest($1::uuid[], $2::int8[]) AS i(id, token)
            WHERE r.id = ANY($1::uuid[]) AND r.id = i.id AND r.lease_token = i.token
            RETURNING r.*
        ), recorded AS (
            INSERT INTO outbox (tenant_id, run_id, event_type, queue, status, attempt, max_attempts,
                                run_at, error, result, prev_txid)
            SELECT released.tenant_id, released.id, t.event_type,
                   released.queue, released.status, released.attempt, released.max_attempts,
                   released.run_at, released.error, released.result, released.prev_event_txid
            FROM released CROSS JOIN LATERAL (
                SELECT runq_outcome_event(released.status, 'released') AS event_type) t
        ), notified AS (
            SELECT pg_notify('runq_pending', '') WHERE EXISTS (SELECT 1 FROM released)
        )
        SELECT id AS "id!" FROM released LEFT JOIN notified ON true
        "#,
        &ids,
        &tokens,
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// What one rescue pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RescueReport {
    /// This worker held the rescuer's lock (else another worker rescues this tick).
    pub led: bool,
    /// Runs put back to pending for another attempt.
    pub retried: u64,
    /// Runs failed because their attempts were used up.
    pub failed: u64,
    /// Runs whose cancel had been requested, now cancelled.
    pub cancelled: u64,
}

/// Takes back up to `limit` running runs whose lease expired (their worker
/// died or stalled): pending again after a backoff while attempts remain, else
/// failed, with `error.reason = "lease_expired"`, an attempt-history entry and
/// an outbox row; a run whose cancel was requested ends `cancelled`. Only the
/// worker that gets the rescuer's advisory lock for this statement does it;
/// rows a completer has locked are skipped.
///
/// # Errors
///
/// Database errors.
pub async fn rescue_expired(
    conn: &mut PgConnection,
    limit: i64,
    backoff: Backoff,
) -> Result<RescueReport, DbError> {
    let row = sqlx::query!(
        r#"
        WITH lead AS (
            -- One rescuer per tick, whichever worker gets the lock. It lives only
            -- as long as this one statement, so a worker paused mid-pass (GC,
            -- SIGSTOP) cannot hold it and stop everyone else's rescues.
            SELECT pg_try_advisory_xact_lock($4) AS led
        ), expired AS (
            SELECT id FROM runs
            WHERE (SELECT led FROM lead) AND status = 'running' AND lease_expires_at < now()
            ORDER BY lease_expires_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        ), rescued AS (
            UPDATE runs r
            SET status = runq_outcome_status(
                    'failed', r.cancel_requested, r.attempt, r.max_attempts),
                run_at = CASE WHEN runq_outcome_status(
                                  'failed', r.cancel_requested, r.attempt, r.max_attempts)
                                  = 'pending'
                              THEN now() + runq_backoff(r.attempt, $2, $3) ELSE r.run_at END,
                finished_at = CASE WHEN runq_outcome_status(
                                       'failed', r.cancel_requested, r.attempt, r.max_attempts)
                                       = 'pending'
                                   THEN NULL ELSE now() END,
                error = runq_rescue_error(r),
                errors = runq_attempt_error(r.errors, r.attempt, r.locked_by,
                                            runq_rescue_error(r)),
                locked_by = NULL, lease_expires_at = NULL, lease_token = r.lease_token + 1,
                prev_event_txid = r.last_event_txid, last_event_txid = pg_current_xact_id()
            WHERE r.id = ANY(ARRAY(SELECT id FROM expired))
            RETURNING r.*
        ), recorded AS (
            INSERT INTO outbox (tenant_id, run_id, event_type, queue, status, attempt, max_attempts,
                                run_at, error, result, prev_txid)
            SELECT rescued.tenant_id, rescued.id, t.event_type,
                   rescued.queue, rescued.status, rescued.attempt, rescued.max_attempts,
                   rescued.run_at, rescued.error, rescued.result, rescued.prev_event_txid
            FROM rescued CROSS JOIN LATERAL (
                SELECT runq_outcome_event(rescued.status, 'rescued') AS event_type) t
        )
        SELECT (SELECT led FROM lead) AS "led!",
               (SELECT count(*) FROM rescued WHERE status = 'pending') AS "retried!",
               (SELECT count(*) FROM rescued WHERE status = 'failed') AS "failed!",
               (SELECT count(*) FROM rescued WHERE status = 'cancelled') AS "cancelled!"
        "#,
        limit,
        backoff.base_ms,
        backoff.max_ms,
        crate::db::workers::Service::Rescuer as i64,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(RescueReport {
        led: row.led,
        retried: row.retried as u64,
        failed: row.failed as u64,
        cancelled: row.cancelled as u64,
    })
}
