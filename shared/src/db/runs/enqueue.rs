//! Inserting runs: one statement per table for any number of runs, with their
//! steps, their `run.created` outbox rows and one `NOTIFY`.

use std::collections::HashMap;

use serde_json::Value;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::db::quotas::{self, RunCharge};
use crate::db::DbError;
use crate::model::{NewRun, Run, RunId, TenantId};

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
/// As [`enqueue_many`].
pub async fn enqueue(conn: &mut PgConnection, run: NewRun) -> Result<Enqueued, DbError> {
    let mut runs = enqueue_many(conn, vec![run]).await?;
    Ok(runs.remove(0))
}

/// Inserts many runs with one statement per table and one `NOTIFY`, whatever
/// the count. Results are in input order. A run whose `(tenant,
/// idempotency_key)` already exists is not inserted again: the existing run is
/// returned when it was created by the same request (same digest), and the
/// call fails with [`DbError::IdempotencyMismatch`] when it was not.
///
/// Tenants with a `runs_per_day` quota are checked once per call, under a
/// per-tenant lock held until the caller's transaction ends (or until this
/// call returns, on a connection outside a transaction), and charged the runs
/// actually inserted. Tenants without one cost one read of `tenant_quotas`.
///
/// # Errors
///
/// [`DbError::Invalid`] for a run [`NewRun::validate`] refuses (nothing is
/// inserted), [`DbError::QuotaExceeded`] when the runs would pass a tenant's
/// `runs_per_day` quota (nothing is inserted; see [`crate::db::quotas`]),
/// [`DbError::ProjectNotFound`] for a project of another tenant,
/// [`DbError::ProductionRefused`] for a `prod` project without its override,
/// [`DbError::IdempotencyMismatch`] (roll back the transaction: other runs of
/// the call may have been inserted), else database errors.
pub async fn enqueue_many(
    conn: &mut PgConnection,
    runs: Vec<NewRun>,
) -> Result<Vec<Enqueued>, DbError> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    for run in &runs {
        run.validate()?;
    }
    check_projects(conn, &runs).await?;
    let mut tenants: Vec<TenantId> = runs.iter().map(|run| run.tenant_id).collect();
    tenants.sort_unstable();
    tenants.dedup();
    // One read per call, whatever the count; tenants without a run quota
    // (the `unlimited` plan) stop here and write nothing more.
    let limits = quotas::run_limits(conn, &tenants).await?;
    if limits.is_empty() {
        return insert(conn, runs).await;
    }
    // Inside a transaction of its own (a savepoint within the caller's), so a
    // refusal leaves nothing inserted and the tenants' quota locks are held
    // until the caller commits.
    let mut tx = conn.begin().await?;
    match enqueue_limited(&mut tx, runs, limits).await {
        Ok(out) => {
            tx.commit().await?;
            Ok(out)
        }
        Err(err) => {
            // Rolled back now, not when the connection is next used: the
            // quota locks must not outlive the refusal on an idle connection.
            tx.rollback().await?;
            Err(err)
        }
    }
}

/// Inserts `runs` of tenants with a `runs_per_day` limit (`limits`) under
/// their quota locks: refuses before inserting when the runs that are sure to
/// be new (those without an idempotency key) pass a limit, then charges what
/// was inserted (a repeated key is not charged), refusing if that passes it.
async fn enqueue_limited(
    conn: &mut PgConnection,
    runs: Vec<NewRun>,
    limits: Vec<(TenantId, i64)>,
) -> Result<Vec<Enqueued>, DbError> {
    let charge = RunCharge::lock(conn, limits).await?;
    let mut sure_new: HashMap<TenantId, i64> = HashMap::new();
    for run in runs.iter().filter(|run| run.idempotency_key.is_none()) {
        *sure_new.entry(run.tenant_id).or_default() += 1;
    }
    charge.check(&sure_new)?;
    let out = insert(conn, runs).await?;
    let mut added: HashMap<TenantId, i64> = HashMap::new();
    for enqueued in out.iter().filter(|enqueued| enqueued.created) {
        *added.entry(enqueued.run.tenant_id).or_default() += 1;
    }
    charge.charge(conn, &added).await?;
    Ok(out)
}

/// Inserts validated `runs` (the body of [`enqueue_many`], without quotas).
async fn insert(conn: &mut PgConnection, runs: Vec<NewRun>) -> Result<Vec<Enqueued>, DbError> {
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
    let mut sequence_keys = Vec::with_capacity(count);
    let mut digests = Vec::with_capacity(count);
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
        digests.push(new.idempotency_key.as_ref().map(|_| new.request_digest()));
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
        sequence_keys.push(run.sequence_key);
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

    let inserted: Vec<Run> = query_runs!(
        r#"
        WITH input AS (
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::int2[],
                                 $6::timestamptz[], $7::int4[], $8::int4[], $9::jsonb[],
                                 $10::text[], $11::int4[], $18::bytea[], $19::text[])
                AS t(id, tenant_id, project_id, queue, priority, run_at, max_attempts,
                     timeout_seconds, metadata, idempotency_key, step_count, idempotency_hash,
                     sequence_key)
        ), keyed AS (
            -- A run with a sequence key waits until the promoter lets it go
            -- (a trigger of migration 20261201000009 wakes the promoter).
            -- Runs with an idempotency key go through ON CONFLICT; the others
            -- are plain inserts, which spare each row a speculative-insertion
            -- record (~48 bytes of WAL) and its check.
            INSERT INTO runs (id, tenant_id, project_id, queue, priority, run_at, max_attempts,
                              timeout_seconds, metadata, idempotency_key, step_count,
                              idempotency_hash, sequence_key, sequence_waiting, last_event_txid)
            SELECT id, tenant_id, project_id, queue, priority, coalesce(run_at, now()),
                   max_attempts, timeout_seconds, metadata, idempotency_key, step_count,
                   idempotency_hash, sequence_key, sequence_key IS NOT NULL, pg_current_xact_id()
            FROM input WHERE idempotency_key IS NOT NULL
            ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL
            DO NOTHING
            RETURNING *
        ), unkeyed AS (
            INSERT INTO runs (id, tenant_id, project_id, queue, priority, run_at, max_attempts,
                              timeout_seconds, metadata, idempotency_key, step_count,
                              idempotency_hash, sequence_key, sequence_waiting, last_event_txid)
            SELECT id, tenant_id, project_id, queue, priority, coalesce(run_at, now()),
                   max_attempts, timeout_seconds, metadata, idempotency_key, step_count,
                   idempotency_hash, sequence_key, sequence_key IS NOT NULL, pg_current_xact_id()
            FROM input WHERE idempotency_key IS NULL
            RETURNING *
        ), inserted AS (
            SELECT * FROM keyed UNION ALL SELECT * FROM unkeyed
        ), steps AS (
            INSERT INTO run_steps (run_id, position, tenant_id, name, kind, input, timeout_seconds)
            SELECT s.run_id, s.position, i.tenant_id, s.name, s.kind, s.input, s.timeout_seconds
            FROM unnest($12::uuid[], $13::int4[], $14::text[], $15::text[], $16::jsonb[],
                        $17::int4[]) AS s(run_id, position, name, kind, input, timeout_seconds)
            JOIN inserted i ON i.id = s.run_id
        ), created AS (
            INSERT INTO outbox (tenant_id, run_id, event_type, queue, status, attempt, max_attempts,
                                run_at, error, result)
            SELECT tenant_id, id, 'run.created', inserted.queue, inserted.status, inserted.attempt, inserted.max_attempts,
                   inserted.run_at, inserted.error, inserted.result
            FROM inserted
        ), notified AS (
            SELECT pg_notify('runq_pending', '') WHERE EXISTS (SELECT 1 FROM inserted)
        )"#,
        "FROM inserted LEFT JOIN notified ON true",
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
        &digests as _,
        &sequence_keys as _,
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(Run::from)
    .collect();

    let mut by_id: HashMap<RunId, Run> = inserted.into_iter().map(|run| (run.id, run)).collect();
    let existing = if by_id.len() < count {
        existing_by_key(conn, &ids, &tenants, &keys, &digests, &by_id).await?
    } else {
        HashMap::new()
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
    Ok(out)
}

/// Loads the runs that won an idempotency-key conflict against this batch,
/// refusing the batch if one of them was created by a different request.
async fn existing_by_key(
    conn: &mut PgConnection,
    ids: &[RunId],
    tenants: &[TenantId],
    keys: &[Option<String>],
    digests: &[Option<Vec<u8>>],
    inserted: &HashMap<RunId, Run>,
) -> Result<HashMap<(TenantId, String), Run>, DbError> {
    let mut wanted_tenants = Vec::new();
    let mut wanted_keys = Vec::new();
    let mut wanted_digests = Vec::new();
    for (index, id) in ids.iter().enumerate() {
        if let (false, Some(key)) = (inserted.contains_key(id), &keys[index]) {
            wanted_tenants.push(tenants[index]);
            wanted_keys.push(key.clone());
            wanted_digests.push(digests[index].clone().unwrap_or_default());
        }
    }
    // Runs keyed before digests were kept have none and match any request.
    let mismatched = sqlx::query_scalar!(
        r#"
        SELECT r.idempotency_key AS "key!"
        FROM runs r
        JOIN unnest($1::uuid[], $2::text[], $3::bytea[]) AS w(tenant_id, key, digest)
          ON r.tenant_id = w.tenant_id AND r.idempotency_key = w.key
        WHERE r.idempotency_hash <> w.digest
        LIMIT 1
        "#,
        &wanted_tenants,
        &wanted_keys,
        &wanted_digests,
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(key) = mismatched {
        return Err(DbError::IdempotencyMismatch(key));
    }
    let rows = query_runs!(
        "",
        r#"FROM runs
        WHERE (tenant_id, idempotency_key) IN (
            SELECT * FROM unnest($1::uuid[], $2::text[]))"#,
        &wanted_tenants,
        &wanted_keys,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(Run::from)
        .filter_map(|run| Some(((run.tenant_id, run.idempotency_key.clone()?), run)))
        .collect())
}

/// Refuses runs that name a project their tenant does not own, or a `prod`
/// project whose production override is off: one statement for the batch.
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
    let gates = crate::db::projects::gates(conn, &tenants, &projects).await?;
    for (tenant, project) in &wanted {
        match gates
            .iter()
            .find(|gate| gate.tenant_id == *tenant && gate.id == *project)
        {
            None => return Err(DbError::ProjectNotFound(*project)),
            Some(gate) if !gate.open => {
                return Err(DbError::ProductionRefused {
                    id: gate.id,
                    name: gate.name.clone(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}
