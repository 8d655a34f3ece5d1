//! Every statement that touches `runs`, and the outbox rows written with them.
//!
//! Each state change of a run writes its outbox row in the same statement, so
//! the two commit together (DESIGN.md, invariant 3). Writes a worker makes are
//! fenced on `locked_by` and `attempt` (invariant 1): a worker whose lease was
//! taken away changes nothing.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::DbError;
use crate::model::{
    NewEvent, NewRun, Run, RunError, RunId, RunStatus, StepStatus, TenantId, WorkerId,
};

/// The outcome of inserting one run.
#[derive(Debug, Clone)]
pub struct Enqueued {
    /// The run: the new one, or the existing one with the same idempotency key.
    pub run: Run,
    /// `false` when an earlier run with the same idempotency key was returned.
    pub created: bool,
}

/// Inserts one run, its steps and its `run.created` outbox row, and notifies
/// workers, on `conn`: inside the caller's transaction if it opened one, so the
/// run exists if and only if the caller's own change commits.
///
/// # Errors
///
/// [`DbError::Invalid`] for a body [`crate::CreateRun::validate`] refuses,
/// [`DbError::ProjectNotFound`] for a project of another tenant, else database errors.
pub async fn enqueue(conn: &mut PgConnection, run: NewRun) -> Result<Enqueued, DbError> {
    let mut runs = enqueue_many(conn, vec![run]).await?;
    Ok(runs.remove(0))
}

/// Inserts many runs with one statement per table and one `NOTIFY`, whatever
/// the count. Results are in input order. Runs whose `(tenant, idempotency_key)`
/// already exists are not inserted again; the existing run is returned.
///
/// # Errors
///
/// As [`enqueue`]; nothing is inserted when any run is invalid.
pub async fn enqueue_many(
    conn: &mut PgConnection,
    runs: Vec<NewRun>,
) -> Result<Vec<Enqueued>, DbError> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    for run in &runs {
        run.run.validate(None)?;
    }
    check_projects(conn, &runs).await?;

    let count = runs.len();
    let mut ids = Vec::with_capacity(count);
    let mut tenants = Vec::with_capacity(count);
    let mut projects = Vec::with_capacity(count);
    let mut queues = Vec::with_capacity(count);
    let mut priorities = Vec::with_capacity(count);
    let mut run_ats = Vec::with_capacity(count);
    let mut max_attempts = Vec::with_capacity(count);
    let mut timeouts = Vec::with_capacity(count);
    let mut metadata = Vec::with_capacity(count);
    let mut keys = Vec::with_capacity(count);
    let mut step_counts = Vec::with_capacity(count);
    let mut step_runs = Vec::new();
    let mut step_positions = Vec::new();
    let mut step_names = Vec::new();
    let mut step_kinds = Vec::new();
    let mut step_inputs = Vec::new();
    let mut step_timeouts = Vec::new();
    for new in runs {
        // Generated here, in order, so a batch keeps its submission order (FIFO).
        let id = Uuid::now_v7();
        let run = new.run;
        ids.push(id);
        tenants.push(new.tenant_id);
        projects.push(run.project_id);
        queues.push(run.queue);
        priorities.push(run.priority);
        run_ats.push(run.run_at);
        max_attempts.push(run.max_attempts);
        timeouts.push(run.timeout_seconds);
        metadata.push(
            run.metadata
                .unwrap_or_else(|| Value::Object(Default::default())),
        );
        keys.push(new.idempotency_key);
        step_counts.push(run.steps.len() as i32);
        for (position, step) in run.steps.into_iter().enumerate() {
            step_runs.push(id);
            step_positions.push(position as i32);
            step_names.push(step.name);
            step_kinds.push(step.kind);
            step_inputs.push(step.input);
            step_timeouts.push(step.timeout_seconds);
        }
    }

    let inserted = sqlx::query_as!(
        Run,
        r#"
        WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::int2[],
                                 $6::timestamptz[], $7::int4[], $8::int4[], $9::jsonb[],
                                 $10::text[], $11::int4[])
                AS t(id, tenant_id, project_id, queue, priority, run_at, max_attempts,
                     timeout_seconds, metadata, idempotency_key, step_count)
        ), inserted AS (
            INSERT INTO runs (id, tenant_id, project_id, queue, priority, run_at, max_attempts,
                              timeout_seconds, metadata, idempotency_key, step_count)
            SELECT id, tenant_id, project_id, queue, priority, coalesce(run_at, now()),
                   max_attempts, timeout_seconds, metadata, idempotency_key, step_count
            FROM input
            ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL
            DO NOTHING
            RETURNING *
        ), steps AS (
            INSERT INTO run_steps (run_id, position, tenant_id, name, kind, input, timeout_seconds)
            SELECT s.run_id, s.position, i.tenant_id, s.name, s.kind, s.input, s.timeout_seconds
            FROM unnest($12::uuid[], $13::int4[], $14::text[], $15::text[], $16::jsonb[],
                        $17::int4[]) AS s(run_id, position, name, kind, input, timeout_seconds)
            JOIN inserted i ON i.id = s.run_id
        ), created AS (
            INSERT INTO outbox (tenant_id, run_id, event_type, payload)
            SELECT tenant_id, id, 'run.created',
                   runq_event_payload('run.created', id, tenant_id, queue, status, attempt,
                                      max_attempts, run_at, error, result)
            FROM inserted
        ), notified AS (
            SELECT pg_notify('runq_pending', '') WHERE EXISTS (SELECT 1 FROM inserted)
        )
        SELECT i.id AS "id!", i.tenant_id AS "tenant_id!", i.project_id, i.queue AS "queue!",
               i.priority AS "priority!", i.status AS "status!: RunStatus",
               i.run_at AS "run_at!", i.attempt AS "attempt!",
               i.max_attempts AS "max_attempts!", i.timeout_seconds,
               i.metadata AS "metadata!", i.idempotency_key,
               i.cancel_requested AS "cancel_requested!", i.result, i.error,
               i.created_at AS "created_at!", i.started_at, i.finished_at
        FROM inserted i LEFT JOIN notified ON true
        "#,
        &ids,
        &tenants,
        &projects as _,
        &queues,
        &priorities,
        &run_ats as _,
        &max_attempts,
        &timeouts as _,
        &metadata,
        &keys as _,
        &step_counts,
        &step_runs,
        &step_positions,
        &step_names,
        &step_kinds,
        &step_inputs,
        &step_timeouts as _,
    )
    .fetch_all(&mut *conn)
    .await?;

    let mut by_id: std::collections::HashMap<RunId, Run> =
        inserted.into_iter().map(|run| (run.id, run)).collect();
    let mut existing = if by_id.len() < count {
        existing_by_key(conn, &ids, &tenants, &keys, &by_id).await?
    } else {
        Default::default()
    };
    let mut out = Vec::with_capacity(count);
    for (index, id) in ids.iter().enumerate() {
        if let Some(run) = by_id.remove(id) {
            out.push(Enqueued { run, created: true });
        } else if let Some(run) = keys[index]
            .as_ref()
            .and_then(|key| existing.get(&(tenants[index], key.clone())).cloned())
        {
            out.push(Enqueued {
                run,
                created: false,
            });
        } else {
            // Only a conflict on the idempotency key skips an insert, and that row exists.
            return Err(DbError::Sqlx(sqlx::Error::RowNotFound));
        }
    }
    existing.clear();
    Ok(out)
}

/// Loads the runs that won an idempotency-key conflict against this batch.
async fn existing_by_key(
    conn: &mut PgConnection,
    ids: &[RunId],
    tenants: &[TenantId],
    keys: &[Option<String>],
    inserted: &std::collections::HashMap<RunId, Run>,
) -> Result<std::collections::HashMap<(TenantId, String), Run>, DbError> {
    let mut wanted_tenants = Vec::new();
    let mut wanted_keys = Vec::new();
    for ((id, tenant), key) in ids.iter().zip(tenants).zip(keys) {
        if let (false, Some(key)) = (inserted.contains_key(id), key) {
            wanted_tenants.push(*tenant);
            wanted_keys.push(key.clone());
        }
    }
    let rows = sqlx::query_as!(
        Run,
        r#"
        SELECT id, tenant_id, project_id, queue, priority, status AS "status: RunStatus",
               run_at, attempt, max_attempts, timeout_seconds, metadata, idempotency_key,
               cancel_requested, result, error, created_at, started_at, finished_at
        FROM runs
        WHERE (tenant_id, idempotency_key) IN (
            SELECT * FROM unnest($1::uuid[], $2::text[]))
        "#,
        &wanted_tenants,
        &wanted_keys,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|run| Some(((run.tenant_id, run.idempotency_key.clone()?), run)))
        .collect())
}

/// Refuses runs that name a project their tenant does not own.
async fn check_projects(conn: &mut PgConnection, runs: &[NewRun]) -> Result<(), DbError> {
    let mut wanted: Vec<(TenantId, Uuid)> = runs
        .iter()
        .filter_map(|new| Some((new.tenant_id, new.run.project_id?)))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    wanted.sort_unstable();
    wanted.dedup();
    let (tenants, projects): (Vec<_>, Vec<_>) = wanted.iter().copied().unzip();
    let found = super::tenants::projects_owned(conn, &tenants, &projects).await?;
    match wanted.iter().find(|pair| !found.contains(pair)) {
        Some((_, project)) => Err(DbError::ProjectNotFound(*project)),
        None => Ok(()),
    }
}

/// A step as a worker receives it with a claimed run.
#[derive(Debug, Clone, Deserialize)]
pub struct ClaimedStep {
    /// Zero-based index.
    pub position: i32,
    /// Name.
    pub name: String,
    /// Handler kind.
    pub kind: String,
    /// Handler input.
    pub input: Value,
    /// Seconds the step may take.
    pub timeout_seconds: Option<i32>,
    /// `succeeded` for steps an earlier attempt finished (their output is kept).
    pub status: StepStatus,
    /// Output of an earlier attempt.
    pub output: Option<Value>,
}

/// A run a worker claimed: everything it needs to execute it.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    /// The run.
    pub id: RunId,
    /// Owner.
    pub tenant_id: TenantId,
    /// Queue.
    pub queue: String,
    /// The attempt this claim started (1 for the first).
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Seconds the run may take.
    pub timeout_seconds: Option<i32>,
    /// Metadata handed to each step.
    pub metadata: Value,
    /// When this attempt was claimed (database clock).
    pub started_at: DateTime<Utc>,
    /// The pipeline, in order, with earlier checkpoints.
    pub steps: Vec<ClaimedStep>,
}

/// Claims up to `limit` pending runs of `queues` for `worker`, FIFO within a
/// priority (DESIGN.md, Claim), with a lease of `lease_ms`, writing a
/// `run.started` outbox row for each. One statement, one commit.
///
/// # Errors
///
/// Database errors.
pub async fn claim(
    conn: &mut PgConnection,
    worker: WorkerId,
    queues: &[String],
    limit: i64,
    lease_ms: i64,
) -> Result<Vec<ClaimedRun>, DbError> {
    let rows = sqlx::query!(
        r#"
        WITH next AS (
            -- DESIGN.md's claim, one queue at a time: `queue = ANY($1)` cannot
            -- walk the pending index in order, so it sorts the whole backlog on
            -- every claim. Per queue the index hands over the head of the queue
            -- in order and the cost stays flat however long the backlog is.
            SELECT n.id FROM unnest($1::text[]) AS q(queue)
            CROSS JOIN LATERAL (
                SELECT id, priority, run_at FROM runs
                WHERE status = 'pending' AND queue = q.queue AND run_at <= now()
                ORDER BY priority DESC, run_at, id
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            ) n
            ORDER BY n.priority DESC, n.run_at, n.id
            LIMIT $2
        ), claimed AS (
            UPDATE runs r
            SET status = 'running', attempt = r.attempt + 1, locked_by = $3,
                started_at = now(), lease_expires_at = now() + $4 * interval '1 millisecond'
            -- Through the primary key. Joined as `FROM next`, the CTE may be
            -- hashed against a scan of all runs; the rescuer and bulk retry
            -- update their locked rows the same way.
            WHERE r.id = ANY(ARRAY(SELECT id FROM next))
            RETURNING r.*
        ), started AS (
            INSERT INTO outbox (tenant_id, run_id, event_type, payload)
            SELECT tenant_id, id, 'run.started',
                   runq_event_payload('run.started', id, tenant_id, queue, status, attempt,
                                      max_attempts, run_at, error, result)
            FROM claimed
        )
        SELECT c.id AS "id!", c.tenant_id AS "tenant_id!", c.queue AS "queue!",
               c.attempt AS "attempt!", c.max_attempts AS "max_attempts!", c.timeout_seconds,
               c.metadata AS "metadata!", c.started_at AS "started_at!",
               -- json, not jsonb: it is only sent to the worker, and building
               -- binary jsonb for every claimed run cost a tenth of the claim.
               (SELECT json_agg(json_build_object(
                    'position', s.position, 'name', s.name, 'kind', s.kind, 'input', s.input,
                    'timeout_seconds', s.timeout_seconds, 'status', s.status,
                    'output', s.output) ORDER BY s.position)
                FROM run_steps s WHERE s.run_id = c.id) AS "steps!: Json<Vec<ClaimedStep>>"
        FROM claimed c
        ORDER BY c.priority DESC, c.run_at, c.id
        "#,
        queues,
        limit,
        worker,
        lease_ms as f64,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| ClaimedRun {
            id: row.id,
            tenant_id: row.tenant_id,
            queue: row.queue,
            attempt: row.attempt,
            max_attempts: row.max_attempts,
            timeout_seconds: row.timeout_seconds,
            metadata: row.metadata,
            started_at: row.started_at,
            steps: row.steps.0,
        })
        .collect())
}

/// Identifies one attempt of one run held by a worker: the fence on every write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The run.
    pub id: RunId,
    /// The attempt the worker claimed.
    pub attempt: i32,
}

/// An event recorded by a step, written with its checkpoint or completion.
#[derive(Debug, Clone)]
pub struct StepEvent {
    /// The run and attempt that recorded it.
    pub lease: Lease,
    /// The step that recorded it.
    pub position: i32,
    /// The event.
    pub event: NewEvent,
}

/// A non-final step finished: its output is stored before the next step starts.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The run and attempt.
    pub lease: Lease,
    /// The finished step.
    pub position: i32,
    /// Its output.
    pub output: Value,
    /// When it started (worker clock; display only).
    pub started_at: DateTime<Utc>,
}

/// What became of a checkpointed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointResult {
    /// Stored; the run may go on.
    Stored {
        /// A client asked to cancel the run: stop before the next step.
        cancel_requested: bool,
    },
    /// The lease is gone; nothing was written and the worker must drop the run.
    LeaseLost,
}

/// Stores step outputs of runs `worker` still holds, with their events. Runs
/// are row-share locked for the statement so the rescuer cannot take one over
/// between the fence check and the write.
///
/// # Errors
///
/// Database errors.
pub async fn checkpoint_many(
    conn: &mut PgConnection,
    worker: WorkerId,
    checkpoints: &[Checkpoint],
    events: &[StepEvent],
) -> Result<Vec<CheckpointResult>, DbError> {
    let mut sorted: Vec<&Checkpoint> = checkpoints.iter().collect();
    sorted.sort_by_key(|c| c.lease.id);
    let ids: Vec<Uuid> = sorted.iter().map(|c| c.lease.id).collect();
    let attempts: Vec<i32> = sorted.iter().map(|c| c.lease.attempt).collect();
    let positions: Vec<i32> = sorted.iter().map(|c| c.position).collect();
    let outputs: Vec<Value> = sorted.iter().map(|c| c.output.clone()).collect();
    let started: Vec<DateTime<Utc>> = sorted.iter().map(|c| c.started_at).collect();
    let events = EventColumns::new(events);
    // Shaped for the planner on stale statistics. Right after a burst of
    // claims, statistics still say no run is locked, so `locked_by = $1` as a
    // filter is estimated at one row and the planner loops the whole input
    // over every held run. The fence is therefore a join column of the input
    // (kept from being folded back into a constant by `OFFSET 0`): runs are
    // found by primary key, or by one hash join on a small table. CTE results
    // are read back as arrays, never joined row by row, for the same reason.
    let rows = sqlx::query!(
        r#"
        WITH owned AS (
            SELECT r.id, r.cancel_requested
            FROM (SELECT *, $1::uuid AS worker FROM unnest($2::uuid[], $3::int4[])
                      AS t(id, attempt) OFFSET 0) i
            JOIN runs r ON r.id = i.id AND r.attempt = i.attempt AND r.locked_by = i.worker
            FOR SHARE OF r
        ), stored AS (
            UPDATE run_steps s
            SET status = 'succeeded', attempt = i.attempt, output = i.output, error = NULL,
                started_at = i.started_at, finished_at = now()
            FROM unnest($2::uuid[], $3::int4[], $4::int4[], $5::jsonb[], $6::timestamptz[])
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
        worker,
        &ids,
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
        .map(|c| match owned.get(&c.lease.id) {
            Some(&cancel_requested) => CheckpointResult::Stored { cancel_requested },
            None => CheckpointResult::LeaseLost,
        })
        .collect())
}

/// How an attempt ended, as the completer writes it.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Every step succeeded; `output` is the last step's and becomes the result.
    Succeeded {
        /// The last step.
        position: i32,
        /// Its output.
        output: Value,
        /// When it started.
        started_at: DateTime<Utc>,
    },
    /// Step `position` failed: retried after a backoff while attempts remain,
    /// else the run fails.
    StepFailed {
        /// The failed step.
        position: i32,
        /// Why.
        error: RunError,
        /// When it started.
        started_at: DateTime<Utc>,
        /// Attempts allowed, to choose between retry and failure.
        max_attempts: i32,
    },
    /// The run exceeded a cap (`error.reason` says which).
    Stopped {
        /// Why.
        error: RunError,
    },
    /// A client cancelled the run.
    Cancelled,
}

/// One finished attempt.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The run and attempt.
    pub lease: Lease,
    /// How it ended.
    pub outcome: Outcome,
}

/// Retry backoff: `base_ms * 2^(attempt-1)` capped at `max_ms`, with jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay after the first failed attempt, in milliseconds.
    pub base_ms: f64,
    /// Longest delay, in milliseconds.
    pub max_ms: f64,
}

/// Writes finished attempts of runs `worker` still holds in one statement: the
/// run's new status, the finished step, the events and the outbox rows. Returns
/// the runs written; a run missing from it had lost its lease and nothing of
/// it was written.
///
/// # Errors
///
/// Database errors.
pub async fn complete_many(
    conn: &mut PgConnection,
    worker: WorkerId,
    completions: &[Completion],
    events: &[StepEvent],
    backoff: Backoff,
) -> Result<Vec<RunId>, DbError> {
    let mut sorted: Vec<&Completion> = completions.iter().collect();
    sorted.sort_by_key(|c| c.lease.id);
    let mut cols = CompletionColumns::default();
    for completion in sorted {
        cols.push(completion);
    }
    let events = EventColumns::new(events);
    // The input is sorted by id, so concurrent completions driven from it
    // into the primary key lock rows in the same order. The fence is a join
    // column, and CTEs are read back as arrays, for the planner's sake (see
    // `checkpoint_many`).
    let written = sqlx::query_scalar!(
        r#"
        WITH done AS (
            UPDATE runs r
            SET status = d.status,
                run_at = CASE WHEN d.status = 'pending'
                              THEN now() + runq_backoff(d.attempt, $12, $13) ELSE r.run_at END,
                locked_by = NULL, lease_expires_at = NULL,
                result = d.result, error = d.error,
                finished_at = CASE WHEN d.status = 'pending' THEN NULL ELSE now() END
            FROM (
                SELECT i.*, CASE
                    WHEN i.outcome = 'succeeded' THEN 'succeeded'::run_status
                    WHEN i.outcome = 'stopped' THEN 'stopped_quota'::run_status
                    WHEN i.outcome = 'cancelled' THEN 'cancelled'::run_status
                    WHEN i.attempt < i.max_attempts THEN 'pending'::run_status
                    ELSE 'failed'::run_status END AS status
                FROM (SELECT *, $1::uuid AS worker
                      FROM unnest($2::uuid[], $3::int4[], $4::text[], $5::jsonb[],
                                  $6::jsonb[], $7::int4[], $8::step_status[], $9::jsonb[],
                                  $10::timestamptz[], $11::int4[])
                          AS t(id, attempt, outcome, result, error, position, step_status,
                               step_output, step_started_at, max_attempts)
                      OFFSET 0) i
            ) d
            WHERE r.id = d.id AND r.attempt = d.attempt AND r.locked_by = d.worker
            RETURNING r.id, r.tenant_id, r.queue, r.status, r.attempt, r.max_attempts, r.run_at,
                      r.error, r.result, d.position, d.step_status, d.step_output,
                      d.step_started_at
        ), step AS (
            UPDATE run_steps s
            SET status = done.step_status, attempt = done.attempt, output = done.step_output,
                error = CASE WHEN done.step_status = 'failed' THEN done.error END,
                started_at = done.step_started_at, finished_at = now()
            FROM done
            WHERE s.run_id = done.id AND s.position = done.position
              AND done.step_status IS NOT NULL
        ), recorded AS (
            INSERT INTO run_events (run_id, tenant_id, attempt, position, kind, data)
            SELECT e.run_id, s.tenant_id, e.attempt, e.position, e.kind, e.data
            FROM unnest($14::uuid[], $15::int4[], $16::int4[], $17::text[], $18::jsonb[])
                WITH ORDINALITY AS e(run_id, attempt, position, kind, data, ord)
            JOIN run_steps s ON s.run_id = e.run_id AND s.position = e.position
            WHERE e.run_id = ANY(ARRAY(SELECT id FROM done))
            ORDER BY e.ord
        ), changed AS (
            SELECT done.*, CASE done.status
                WHEN 'succeeded' THEN 'run.succeeded'
                WHEN 'pending' THEN 'run.retrying'
                WHEN 'failed' THEN 'run.failed'
                WHEN 'stopped_quota' THEN 'run.stopped'
                ELSE 'run.cancelled' END AS event_type
            FROM done
        ), recorded_outbox AS (
            INSERT INTO outbox (tenant_id, run_id, event_type, payload)
            SELECT tenant_id, id, event_type,
                   runq_event_payload(event_type, id, tenant_id, queue, status, attempt,
                                      max_attempts, run_at, error, result)
            FROM changed
        )
        SELECT id AS "id!" FROM done
        "#,
        worker,
        &cols.ids,
        &cols.attempts,
        &cols.outcomes as _,
        &cols.results as _,
        &cols.errors as _,
        &cols.positions as _,
        &cols.step_statuses as _,
        &cols.step_outputs as _,
        &cols.step_started as _,
        &cols.max_attempts,
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
    attempts: Vec<i32>,
    outcomes: Vec<&'static str>,
    results: Vec<Option<Value>>,
    errors: Vec<Option<Value>>,
    positions: Vec<Option<i32>>,
    step_statuses: Vec<Option<StepStatus>>,
    step_outputs: Vec<Option<Value>>,
    step_started: Vec<Option<DateTime<Utc>>>,
    max_attempts: Vec<i32>,
}

impl CompletionColumns {
    fn push(&mut self, completion: &Completion) {
        self.ids.push(completion.lease.id);
        self.attempts.push(completion.lease.attempt);
        let error_json = |error: &RunError| serde_json::to_value(error).ok();
        match &completion.outcome {
            Outcome::Succeeded {
                position,
                output,
                started_at,
            } => {
                self.outcomes.push("succeeded");
                self.results.push(Some(output.clone()));
                self.errors.push(None);
                self.positions.push(Some(*position));
                self.step_statuses.push(Some(StepStatus::Succeeded));
                self.step_outputs.push(Some(output.clone()));
                self.step_started.push(Some(*started_at));
                self.max_attempts.push(0);
            }
            Outcome::StepFailed {
                position,
                error,
                started_at,
                max_attempts,
            } => {
                self.outcomes.push("step_failed");
                self.results.push(None);
                self.errors.push(error_json(error));
                self.positions.push(Some(*position));
                self.step_statuses.push(Some(StepStatus::Failed));
                self.step_outputs.push(None);
                self.step_started.push(Some(*started_at));
                self.max_attempts.push(*max_attempts);
            }
            Outcome::Stopped { error } => {
                self.outcomes.push("stopped");
                self.results.push(None);
                self.errors.push(error_json(error));
                self.positions.push(None);
                self.step_statuses.push(None);
                self.step_outputs.push(None);
                self.step_started.push(None);
                self.max_attempts.push(0);
            }
            Outcome::Cancelled => {
                self.outcomes.push("cancelled");
                self.results.push(None);
                self.errors.push(error_json(&RunError {
                    reason: crate::model::ErrorReason::Cancelled,
                    message: "cancelled by a client".to_owned(),
                    position: None,
                }));
                self.positions.push(None);
                self.step_statuses.push(None);
                self.step_outputs.push(None);
                self.step_started.push(None);
                self.max_attempts.push(0);
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
    fn new(events: &[StepEvent]) -> Self {
        Self {
            runs: events.iter().map(|e| e.lease.id).collect(),
            attempts: events.iter().map(|e| e.lease.attempt).collect(),
            positions: events.iter().map(|e| e.position).collect(),
            kinds: events.iter().map(|e| e.event.kind.clone()).collect(),
            data: events.iter().map(|e| e.event.data.clone()).collect(),
        }
    }
}

/// A held run as a heartbeat found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldRun {
    /// The run.
    pub id: RunId,
    /// A client asked to cancel it.
    pub cancel_requested: bool,
}

/// Extends the leases of runs `worker` still holds by `lease_ms` in one
/// statement. Runs missing from the answer were taken away: drop them. Runs
/// locked by a concurrent write of the worker itself are reported held but
/// not extended this time.
///
/// # Errors
///
/// Database errors.
pub async fn extend_leases(
    conn: &mut PgConnection,
    worker: WorkerId,
    leases: &[Lease],
    lease_ms: i64,
) -> Result<Vec<HeldRun>, DbError> {
    let ids: Vec<Uuid> = leases.iter().map(|l| l.id).collect();
    let attempts: Vec<i32> = leases.iter().map(|l| l.attempt).collect();
    let rows = sqlx::query_as!(
        HeldRun,
        r#"
        WITH free AS (
            -- Rows the completer is writing right now are skipped, not waited
            -- for: the heartbeat never waits on a lock, so it can never be part
            -- of a deadlock, and those runs are about to be finished anyway.
            SELECT r.id
            FROM (SELECT *, $1::uuid AS worker FROM unnest($2::uuid[], $3::int4[])
                      AS t(id, attempt) OFFSET 0) i
            JOIN runs r ON r.id = i.id AND r.attempt = i.attempt AND r.locked_by = i.worker
            FOR UPDATE OF r SKIP LOCKED
        ), extended AS (
            UPDATE runs r SET lease_expires_at = now() + $4 * interval '1 millisecond'
            WHERE r.id = ANY(ARRAY(SELECT id FROM free))
        )
        SELECT r.id AS "id!", r.cancel_requested AS "cancel_requested!"
        FROM (SELECT *, $1::uuid AS worker FROM unnest($2::uuid[], $3::int4[])
                  AS t(id, attempt) OFFSET 0) i
        JOIN runs r ON r.id = i.id AND r.attempt = i.attempt AND r.locked_by = i.worker
        "#,
        worker,
        &ids,
        &attempts,
        lease_ms as f64,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

/// Hands runs `worker` holds back to pending without charging the attempt
/// (graceful shutdown), with a `run.released` outbox row each.
///
/// # Errors
///
/// Database errors.
pub async fn release_many(
    conn: &mut PgConnection,
    worker: WorkerId,
    leases: &[Lease],
) -> Result<Vec<RunId>, DbError> {
    let mut sorted: Vec<Lease> = leases.to_vec();
    sorted.sort_by_key(|l| l.id);
    let ids: Vec<Uuid> = sorted.iter().map(|l| l.id).collect();
    let attempts: Vec<i32> = sorted.iter().map(|l| l.attempt).collect();
    let released = sqlx::query_scalar!(
        r#"
        WITH released AS (
            UPDATE runs r
            SET status = 'pending', attempt = r.attempt - 1, locked_by = NULL,
                lease_expires_at = NULL, started_at = NULL, run_at = now()
            FROM (SELECT *, $1::uuid AS worker FROM unnest($2::uuid[], $3::int4[])
                      AS t(id, attempt) OFFSET 0) i
            WHERE r.id = i.id AND r.attempt = i.attempt AND r.locked_by = i.worker
            RETURNING r.*
        ), recorded AS (
            INSERT INTO outbox (tenant_id, run_id, event_type, payload)
            SELECT tenant_id, id, 'run.released',
                   runq_event_payload('run.released', id, tenant_id, queue, status, attempt,
                                      max_attempts, run_at, error, result)
            FROM released
        ), notified AS (
            SELECT pg_notify('runq_pending', '') WHERE EXISTS (SELECT 1 FROM released)
        )
        SELECT id AS "id!" FROM released LEFT JOIN notified ON true
        "#,
        worker,
        &ids,
        &attempts,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(released)
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
}

/// Takes back up to `limit` running runs whose lease expired (their worker
/// died or stalled): pending again after a backoff while attempts remain, else
/// failed, with `error.reason = "lease_expired"` and an outbox row. Only the
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
            SET status = CASE WHEN r.attempt >= r.max_attempts THEN 'failed'::run_status
                              ELSE 'pending'::run_status END,
                run_at = CASE WHEN r.attempt >= r.max_attempts THEN r.run_at
                              ELSE now() + runq_backoff(r.attempt, $2, $3) END,
                finished_at = CASE WHEN r.attempt >= r.max_attempts THEN now() END,
                error = jsonb_build_object(
                    'reason', 'lease_expired',
                    'message', format('the lease of worker %s expired at %s',
                                      r.locked_by, r.lease_expires_at)),
                locked_by = NULL, lease_expires_at = NULL
            WHERE r.id = ANY(ARRAY(SELECT id FROM expired))
            RETURNING r.*
        ), recorded AS (
            INSERT INTO outbox (tenant_id, run_id, event_type, payload)
            SELECT tenant_id, id, event_type,
                   runq_event_payload(event_type, id, tenant_id, queue, status, attempt,
                                      max_attempts, run_at, error, result)
            FROM (SELECT *, CASE WHEN status = 'failed' THEN 'run.failed'
                                 ELSE 'run.retrying' END AS event_type
                  FROM rescued) changed
        )
        SELECT (SELECT led FROM lead) AS "led!",
               (SELECT count(*) FROM rescued WHERE status = 'pending') AS "retried!",
               (SELECT count(*) FROM rescued WHERE status = 'failed') AS "failed!"
        "#,
        limit,
        backoff.base_ms,
        backoff.max_ms,
        super::workers::Service::Rescuer as i64,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(RescueReport {
        led: row.led,
        retried: row.retried as u64,
        failed: row.failed as u64,
    })
}

/// Tells waiting workers that runs are claimable (once per transaction).
///
/// # Errors
///
/// Database errors.
pub async fn notify_pending(conn: &mut PgConnection) -> Result<(), DbError> {
    sqlx::query!("SELECT pg_notify('runq_pending', '')")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The run `id` if `tenant` owns it.
///
/// # Errors
///
/// [`DbError::RunNotFound`] when it does not exist for this tenant.
pub async fn get(conn: &mut PgConnection, tenant: TenantId, id: RunId) -> Result<Run, DbError> {
    sqlx::query_as!(
        Run,
        r#"
        SELECT id, tenant_id, project_id, queue, priority, status AS "status: RunStatus",
               run_at, attempt, max_attempts, timeout_seconds, metadata, idempotency_key,
               cancel_requested, result, error, created_at, started_at, finished_at
        FROM runs WHERE id = $1 AND tenant_id = $2
        "#,
        id,
        tenant,
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(DbError::RunNotFound(id))
}

/// Which runs [`list`] returns.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only runs in this status.
    pub status: Option<RunStatus>,
    /// Only runs of this queue.
    pub queue: Option<String>,
    /// Only runs of this project.
    pub project_id: Option<Uuid>,
    /// Only runs older than this id (the previous page's last id).
    pub before: Option<RunId>,
}

/// A tenant's runs, newest first, at most `limit`.
///
/// # Errors
///
/// Database errors.
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    filter: &RunFilter,
    limit: i64,
) -> Result<Vec<Run>, DbError> {
    Ok(sqlx::query_as!(
        Run,
        r#"
        SELECT id, tenant_id, project_id, queue, priority, status AS "status: RunStatus",
               run_at, attempt, max_attempts, timeout_seconds, metadata, idempotency_key,
               cancel_requested, result, error, created_at, started_at, finished_at
        FROM runs
        WHERE tenant_id = $1
          AND ($2::run_status IS NULL OR status = $2)
          AND ($3::text IS NULL OR queue = $3)
          AND ($4::uuid IS NULL OR project_id = $4)
          AND ($5::uuid IS NULL OR id < $5)
        ORDER BY id DESC
        LIMIT $6
        "#,
        tenant,
        filter.status as Option<RunStatus>,
        filter.queue,
        filter.project_id,
        filter.before,
        limit,
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Cancels run `id`: a pending run becomes `cancelled` now (with its outbox
/// row); a running run is flagged and its worker notified, and the worker stops
/// it. Cancelling a cancelled run is a no-op. Run it in a transaction.
///
/// # Errors
///
/// [`DbError::RunNotFound`], or [`DbError::WrongStatus`] for a finished run.
pub async fn cancel(conn: &mut PgConnection, tenant: TenantId, id: RunId) -> Result<Run, DbError> {
    let status = lock_status(conn, tenant, id).await?;
    match status {
        RunStatus::Pending => {
            sqlx::query!(
                r#"
                WITH cancelled AS (
                    UPDATE runs SET status = 'cancelled', finished_at = now(),
                        error = '{"reason": "cancelled", "message": "cancelled by a client"}'
                    WHERE id = $1 RETURNING *
                )
                INSERT INTO outbox (tenant_id, run_id, event_type, payload)
                SELECT tenant_id, id, 'run.cancelled',
                       runq_event_payload('run.cancelled', id, tenant_id, queue, status,
                                          attempt, max_attempts, run_at, error, result)
                FROM cancelled
                "#,
                id,
            )
            .execute(&mut *conn)
            .await?;
        }
        RunStatus::Running => {
            sqlx::query!("UPDATE runs SET cancel_requested = true WHERE id = $1", id)
                .execute(&mut *conn)
                .await?;
            sqlx::query!("SELECT pg_notify('runq_cancel', $1)", id.to_string())
                .execute(&mut *conn)
                .await?;
        }
        RunStatus::Cancelled => {}
        other => {
            return Err(DbError::WrongStatus {
                id,
                status: other.as_str(),
                operation: "cancel",
                needs: "pending or running",
            })
        }
    }
    get(conn, tenant, id).await
}

/// Puts a failed, stopped or cancelled run back to pending with fresh
/// attempts; it resumes at its first unfinished step. Run it in a transaction.
///
/// # Errors
///
/// [`DbError::RunNotFound`], or [`DbError::WrongStatus`] for a run that is
/// pending, running or succeeded.
pub async fn retry(conn: &mut PgConnection, tenant: TenantId, id: RunId) -> Result<Run, DbError> {
    let status = lock_status(conn, tenant, id).await?;
    if !matches!(
        status,
        RunStatus::Failed | RunStatus::StoppedQuota | RunStatus::Cancelled
    ) {
        return Err(DbError::WrongStatus {
            id,
            status: status.as_str(),
            operation: "retry",
            needs: "failed, stopped_quota or cancelled",
        });
    }
    sqlx::query!(
        r#"
        WITH requeued AS (
            UPDATE runs SET status = 'pending', attempt = 0, run_at = now(), error = NULL,
                result = NULL, finished_at = NULL, started_at = NULL, cancel_requested = false
            WHERE id = $1 RETURNING *
        )
        INSERT INTO outbox (tenant_id, run_id, event_type, payload)
        SELECT tenant_id, id, 'run.requeued',
               runq_event_payload('run.requeued', id, tenant_id, queue, status, attempt,
                                  max_attempts, run_at, error, result)
        FROM requeued
        "#,
        id,
    )
    .execute(&mut *conn)
    .await?;
    notify_pending(conn).await?;
    get(conn, tenant, id).await
}

async fn lock_status(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: RunId,
) -> Result<RunStatus, DbError> {
    sqlx::query_scalar!(
        r#"SELECT status AS "status: RunStatus" FROM runs
           WHERE id = $1 AND tenant_id = $2 FOR UPDATE"#,
        id,
        tenant,
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(DbError::RunNotFound(id))
}

/// Puts up to `limit` of `tenant`'s runs in `status` (failed, stopped_quota or
/// cancelled), optionally of one queue or project, back to pending with fresh
/// attempts, oldest first, each with a `run.requeued` outbox row. Runs locked
/// by a concurrent change are skipped.
///
/// # Errors
///
/// Database errors.
pub async fn retry_many(
    conn: &mut PgConnection,
    tenant: TenantId,
    status: RunStatus,
    queue: Option<&str>,
    project_id: Option<Uuid>,
    limit: i64,
) -> Result<Vec<RunId>, DbError> {
    Ok(sqlx::query_scalar!(
        r#"
        WITH target AS (
            SELECT id FROM runs
            WHERE tenant_id = $1 AND status = $2
              AND status IN ('failed', 'stopped_quota', 'cancelled')
              AND ($3::text IS NULL OR queue = $3)
              AND ($4::uuid IS NULL OR project_id = $4)
            ORDER BY id
            LIMIT $5
            FOR UPDATE SKIP LOCKED
        ), requeued AS (
            UPDATE runs r SET status = 'pending', attempt = 0, run_at = now(), error = NULL,
                result = NULL, finished_at = NULL, started_at = NULL, cancel_requested = false
            WHERE r.id = ANY(ARRAY(SELECT id FROM target))
            RETURNING r.*
        ), recorded AS (
            INSERT INTO outbox (tenant_id, run_id, event_type, payload)
            SELECT tenant_id, id, 'run.requeued',
                   runq_event_payload('run.requeued', id, tenant_id, queue, status, attempt,
                                      max_attempts, run_at, error, result)
            FROM requeued
        ), notified AS (
            SELECT pg_notify('runq_pending', '') WHERE EXISTS (SELECT 1 FROM requeued)
        )
        SELECT id AS "id!" FROM requeued LEFT JOIN notified ON true ORDER BY id
        "#,
        tenant,
        status as RunStatus,
        queue,
        project_id,
        limit,
    )
    .fetch_all(&mut *conn)
    .await?)
}
