//! A worker's writes about the runs it holds: checkpoints of finished steps
//! and the outcomes of finished attempts, each batch in one statement, each
//! row fenced on its lease token (see the module doc of [`super`]).

use std::borrow::Borrow;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::DbError;
use crate::model::{ErrorReason, RunError, RunId, StepStatus};
use crate::protocol::{Backoff, Checkpoint, CheckpointResult, Completion, Outcome, StepEvent};

/// Stores step outputs of runs whose lease is still current, with their
/// events. Runs are row-share locked for the statement so the rescuer cannot
/// take one over between the fence check and the write. Results are in input
/// order.
///
/// # Errors
///
/// Database errors: the whole batch is written or none of it.
pub async fn checkpoint_many<C: Borrow<Checkpoint>>(
    conn: &mut PgConnection,
    checkpoints: &[C],
    events: &[&StepEvent],
) -> Result<Vec<CheckpointResult>, DbError> {
    let mut sorted: Vec<&Checkpoint> = checkpoints.iter().map(Borrow::borrow).collect();
    sorted.sort_by_key(|c| c.lease.id);
    let ids: Vec<Uuid> = sorted.iter().map(|c| c.lease.id).collect();
    let tokens: Vec<i64> = sorted.iter().map(|c| c.lease.token).collect();
    let attempts: Vec<i32> = sorted.iter().map(|c| c.lease.attempt).collect();
    let positions: Vec<i32> = sorted.iter().map(|c| c.position).collect();
    let outputs: Vec<Value> = sorted.iter().map(|c| c.output.clone()).collect();
    let started: Vec<DateTime<Utc>> = sorted.iter().map(|c| c.started_at).collect();
    let events = EventColumns::new(events);
    // Runs are reached through the primary key (`r.id = ANY($1)`): joined to
    // the input alone, the planner hashes the input against a scan of every
    // run. CTE results are read back as arrays, never joined row by row:
    // right after a burst of claims the statistics are stale and the planner
    // would loop the whole input over each owned row.
    let rows = sqlx::query!(
        r#"
        WITH owned AS (
            SELECT r.id, r.cancel_requested
            FROM unnest($1::uuid[], $2::int8[]) AS i(id, token)
            JOIN runs r ON r.id = i.id AND r.lease_token = i.token
            WHERE r.id = ANY($1::uuid[])
            FOR SHARE OF r
        ), stored AS (
            UPDATE run_steps s
            SET status = 'succeeded', attempt = i.attempt, output = i.output, error = NULL,
                started_at = i.started_at, finished_at = now()
            FROM unnest($1::uuid[], $3::int4[], $4::int4[], $5::jsonb[], $6::timestamptz[])
                AS i(id, attempt, position, output, started_at)
            WHERE s.run_id = i.id AND s.position = i.position
              AND i.id = ANY(ARRAY(SELECT id FROM owned))
        ), recorded AS (
            INSERT INTO run_events (run_id, tenant_id, attempt, position, kind, data)
            SELECT e.run_id, s.tenant_id, e.attempt, e.position, e.kind, e.data
            FROM unnest($7::uuid[], $8::int4[], $9::int4[], $10::text[], $11::jsonb[])
                WITH ORDINALITY AS e(run_id, attempt, position, kind, data, ord)
            JOIN run_steps s ON s.run_id = e.run_id AND s.position = e.position
            WHERE e.run_id = ANY(ARRAY(SELECT id FROM owned))
            ORDER BY e.ord
        )
        SELECT id AS "id!", cancel_requested AS "cancel_requested!" FROM owned
        "#,
        &ids,
        &tokens,
        &attempts,
        &positions,
        &outputs,
        &started,
        &events.runs,
        &events.attempts,
        &events.positions,
        &events.kinds,
        &events.data,
    )
    .fetch_all(&mut *conn)
    .await?;
    let owned: std::collections::HashMap<Uuid, bool> = rows
        .into_iter()
        .map(|row| (row.id, row.cancel_requested))
        .collect();
    Ok(checkpoints
        .iter()
        .map(|c| match owned.get(&c.borrow().lease.id) {
            Some(&cancel_requested) => CheckpointResult::Stored { cancel_requested },
            None => CheckpointResult::LeaseLost,
        })
        .collect())
}

/// Writes finished attempts of runs whose lease is still current, in one
/// statement: the run's new status (`runq_outcome_status`: a failure is
/// retried after `backoff` while attempts remain, a requested cancel wins over
/// a retry), the attempt history, the finished step, the events and the
/// outbox rows. Returns the runs written; a run missing from it had lost its
/// lease and nothing of it was written.
///
/// # Errors
///
/// Database errors: the whole batch is written or none of it.
pub async fn complete_many<C: Borrow<Completion>>(
    conn: &mut PgConnection,
    completions: &[C],
    events: &[&StepEvent],
    backoff: Backoff,
) -> Result<Vec<RunId>, DbError> {
    let mut sorted: Vec<&Completion> = completions.iter().map(Borrow::borrow).collect();
    sorted.sort_by_key(|c| c.lease.id);
    let mut cols = CompletionColumns::default();
    for completion in sorted {
        cols.push(completion);
    }
    let events = EventColumns::new(events);
    // The input is sorted by id, so concurrent completions driven from it
    // into the primary key lock rows in the same order. `r.id = ANY($1)`
    // keeps the planner on the primary key (see `checkpoint_many`).
    let written = sqlx::query_scalar!(
        r#"
        WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::int8[], $3::int4[], $4::text[], $5::jsonb[],
                                 $6::jsonb[], $7::int4[], $8::step_status[], $9::jsonb[],
                                 $10::timestamptz[])
                AS t(id, token, attempt, outcome, result, error, position, step_status,
                     step_output, step_started_at)
        ), done AS (
            UPDATE runs r
            -- The status is computed from the row as it is now, under its lock
            -- (a cancel requested meanwhile wins over a retry), so it is
            -- spelled out in every column that depends on it.
            SET status = runq_outcome_status(
                    i.outcome, r.cancel_requested, r.attempt, r.max_attempts),
                run_at = CASE WHEN runq_outcome_status(
                                  i.outcome, r.cancel_requested, r.attempt, r.max_attempts)
                                  = 'pending'
                              THEN now() + runq_backoff(r.attempt, $11, $12) ELSE r.run_at END,
                finished_at = CASE WHEN runq_outcome_status(
                                       i.outcome, r.cancel_requested, r.attempt, r.max_attempts)
                                       = 'pending'
                                   THEN NULL ELSE now() END,
                locked_by = NULL, lease_expires_at = NULL, lease_token = r.lease_token + 1,
                result = i.result, error = i.error,
                prev_event_txid = r.last_event_txid, last_event_txid = pg_current_xact_id(),
                errors = CASE WHEN i.outcome = 'succeeded' THEN r.errors
                              ELSE runq_attempt_error(r.errors, r.attempt, r.locked_by, i.error)
                         END
            FROM input i
            WHERE r.id = ANY($1::uuid[]) AND r.id = i.id AND r.lease_token = i.token
            RETURNING r.*
        ), step AS (
            UPDATE run_steps s
            SET status = i.step_status, attempt = i.attempt, output = i.step_output,
                error = CASE WHEN i.step_status = 'failed' THEN i.error END,
                started_at = i.step_started_at, finished_at = now()
            FROM input i
            WHERE s.run_id = i.id AND s.position = i.position AND i.step_status IS NOT NULL
              AND i.id = ANY(ARRAY(SELECT id FROM done))
        ), recorded AS (
            INSERT INTO run_events (run_id, tenant_id, attempt, position, kind, data)
            SELECT e.run_id, s.tenant_id, e.attempt, e.position, e.kind, e.data
            FROM unnest($13::uuid[], $14::int4[], $15::int4[], $16::text[], $17::jsonb[])
                WITH ORDINALITY AS e(run_id, attempt, position, kind, data, ord)
            JOIN run_steps s ON s.run_id = e.run_id AND s.position = e.position
            WHERE e.run_id = ANY(ARRAY(SELECT id FROM done))
            ORDER BY e.ord
        ), recorded_outbox AS (
            INSERT INTO outbox (tenant_id, run_id, event_type, queue, status, attempt, max_attempts,
                                run_at, error, result, prev_txid)
            SELECT done.tenant_id, done.id, t.event_type,
                   done.queue, done.status, done.attempt, done.max_attempts,
                   done.run_at, done.error, done.result, done.prev_event_txid
            FROM done CROSS JOIN LATERAL (
                SELECT runq_outcome_event(done.status, 'completed') AS event_type) t
        )
        SELECT id AS "id!" FROM done
        "#,
        &cols.ids,
        &cols.tokens,
        &cols.attempts,
        &cols.outcomes as _,
        &cols.results as _,
        &cols.errors as _,
        &cols.positions as _,
        &cols.step_statuses as _,
        &cols.step_outputs as _,
        &cols.step_started as _,
        backoff.base_ms,
        backoff.max_ms,
        &events.runs,
        &events.attempts,
        &events.positions,
        &events.kinds,
        &events.data,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(written)
}

#[derive(Default)]
struct CompletionColumns {
    ids: Vec<Uuid>,
    tokens: Vec<i64>,
    attempts: Vec<i32>,
    outcomes: Vec<&'static str>,
    results: Vec<Option<Value>>,
    errors: Vec<Option<Value>>,
    positions: Vec<Option<i32>>,
    step_statuses: Vec<Option<StepStatus>>,
    step_outputs: Vec<Option<Value>>,
    step_started: Vec<Option<DateTime<Utc>>>,
}

impl CompletionColumns {
    fn push(&mut self, completion: &Completion) {
        self.ids.push(completion.lease.id);
        self.tokens.push(completion.lease.token);
        self.attempts.push(completion.lease.attempt);
        let error_json = |error: &RunError| serde_json::to_value(error).ok();
        let (outcome, result, error, step) = match &completion.outcome {
            Outcome::Succeeded {
                position,
                output,
                started_at,
            } => (
                "succeeded",
                Some(output.clone()),
                None,
                Some((
                    *position,
                    StepStatus::Succeeded,
                    Some(output.clone()),
                    *started_at,
                )),
            ),
            Outcome::Failed { step, error } => (
                "failed",
                None,
                error_json(error),
                step.as_ref()
                    .map(|s| (s.position, StepStatus::Failed, None, s.started_at)),
            ),
            Outcome::Stopped { error } => ("stopped", None, error_json(error), None),
            Outcome::Cancelled => (
                "cancelled",
                None,
                error_json(&RunError::new(
                    ErrorReason::Cancelled,
                    "cancelled by a client",
                    None,
                )),
                None,
            ),
        };
        self.outcomes.push(outcome);
        self.results.push(result);
        self.errors.push(error);
        match step {
            Some((position, status, output, started_at)) => {
                self.positions.push(Some(position));
                self.step_statuses.push(Some(status));
                self.step_outputs.push(output);
                self.step_started.push(Some(started_at));
            }
            None => {
                self.positions.push(None);
                self.step_statuses.push(None);
                self.step_outputs.push(None);
                self.step_started.push(None);
            }
        }
    }
}

struct EventColumns {
    runs: Vec<Uuid>,
    attempts: Vec<i32>,
    positions: Vec<i32>,
    kinds: Vec<String>,
    data: Vec<Value>,
}

impl EventColumns {
    fn new(events: &[&StepEvent]) -> Self {
        Self {
            runs: events.iter().map(|e| e.lease.id).collect(),
            attempts: events.iter().map(|e| e.lease.attempt).collect(),
            positions: events.iter().map(|e| e.position).collect(),
            kinds: events.iter().map(|e| e.event.kind.clone()).collect(),
            data: events.iter().map(|e| e.event.data.clone()).collect(),
        }
    }
}
