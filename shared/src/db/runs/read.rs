//! What clients read: one run, or a tenant's runs page by page.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::DbError;
use crate::model::{Run, RunId, RunStatus, TenantId};

/// The run `id` if `tenant` owns it.
///
/// # Errors
///
/// [`DbError::RunNotFound`] when it does not exist for this tenant.
pub async fn get(conn: &mut PgConnection, tenant: TenantId, id: RunId) -> Result<Run, DbError> {
    query_runs!("", "FROM runs WHERE id = $1 AND tenant_id = $2", id, tenant)
        .fetch_optional(&mut *conn)
        .await?
        .map(Run::from)
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
    // No stored queue name holds `\u0000` (and Postgres would refuse it as a
    // parameter): such a filter matches nothing.
    if filter.queue.as_deref().is_some_and(|q| q.contains('\0')) {
        return Ok(Vec::new());
    }
    Ok(query_runs!(
        "",
        r#"FROM runs
        WHERE tenant_id = $1
          AND ($2::run_status IS NULL OR status = $2)
          AND ($3::text IS NULL OR queue = $3)
          AND ($4::uuid IS NULL OR project_id = $4)
          AND ($5::uuid IS NULL OR id < $5)
        ORDER BY id DESC
        LIMIT $6"#,
        tenant,
        filter.status as Option<RunStatus>,
        filter.queue,
        filter.project_id,
        filter.before,
        limit,
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(Run::from)
    .collect())
}

/// The attempt ingested events of run `id` are recorded under, if the run
/// takes events now: it is `running`, or its latest attempt ended (the run
/// finished, or failed and waits for its retry) at most `grace_seconds` ago
/// on the database clock. `project`, when given, is the one project the
/// caller may write to; a run of another project is not found.
///
/// # Errors
///
/// [`DbError::RunNotFound`] when `tenant` (and `project`) has no such run,
/// [`DbError::RunNotIngesting`] when it takes no events now.
pub async fn ingest_attempt(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: RunId,
    project: Option<Uuid>,
    grace_seconds: i64,
) -> Result<i32, DbError> {
    let row = sqlx::query!(
        r#"
        SELECT r.status AS "status: RunStatus", r.attempt,
               coalesce(r.status = 'running'
                        OR e.ended_at >= now() - make_interval(secs => $4), false) AS "open!",
               floor(extract(epoch FROM now() - e.ended_at))::bigint AS ended_seconds_ago
        FROM runs r
        CROSS JOIN LATERAL (
            SELECT CASE
                WHEN r.status = 'running' THEN NULL
                WHEN r.finished_at IS NOT NULL THEN r.finished_at
                -- A failed attempt waiting for its retry: when it ended.
                WHEN r.status = 'pending' AND r.attempt > 0
                    THEN (r.errors -> -1 ->> 'at')::timestamptz
            END AS ended_at
        ) e
        WHERE r.id = $1 AND r.tenant_id = $2 AND ($3::uuid IS NULL OR r.project_id = $3)
        "#,
        id,
        tenant,
        project,
        grace_seconds as f64,
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(DbError::RunNotFound(id))?;
    if !row.open {
        return Err(DbError::RunNotIngesting {
            id,
            status: row.status.as_str(),
            ended_seconds_ago: row.ended_seconds_ago,
            grace_seconds,
        });
    }
    Ok(row.attempt)
}

/// `tenant`'s runs per queue (only `queue` when given), with counts by
/// status, the oldest due pending run's wait and the last minute's starts
/// and finishes. Queues it has no runs in are absent.
///
/// # Errors
///
/// Database errors.
pub async fn queue_stats(
    conn: &mut PgConnection,
    tenant: TenantId,
    queue: Option<&str>,
) -> Result<Vec<crate::model::QueueStats>, DbError> {
    Ok(sqlx::query_as!(
        crate::model::QueueStats,
        r#"
        SELECT r.queue AS "name!",
               count(*) FILTER (WHERE status = 'pending') AS "pending!",
               count(*) FILTER (WHERE status = 'running') AS "running!",
               count(*) FILTER (WHERE status = 'succeeded') AS "succeeded!",
               count(*) FILTER (WHERE status = 'failed') AS "failed!",
               count(*) FILTER (WHERE status = 'stopped_quota') AS "stopped_quota!",
               count(*) FILTER (WHERE status = 'cancelled') AS "cancelled!",
               extract(epoch FROM now() - min(run_at)
                       FILTER (WHERE status = 'pending' AND run_at <= now()))::float8
                   AS oldest_pending_seconds,
               count(*) FILTER (WHERE started_at > now() - interval '1 minute')
                   AS "started_last_minute!",
               count(*) FILTER (WHERE finished_at > now() - interval '1 minute')
                   AS "finished_last_minute!",
               coalesce(bool_or(s.paused), false) AS "paused!",
               max(s.concurrency) AS concurrency_limit,
               max(s.rate_per_second) AS rate_limit_per_second
        FROM runs r
        LEFT JOIN queues s ON s.name = r.queue
        WHERE r.tenant_id = $1 AND ($2::text IS NULL OR r.queue = $2)
        GROUP BY r.queue
        ORDER BY r.queue
        "#,
        tenant,
        queue,
    )
    .fetch_all(&mut *conn)
    .await?)
}
