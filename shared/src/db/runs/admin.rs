//! What clients change about existing runs: cancel, retry, bulk retry.

use sqlx::PgConnection;
use uuid::Uuid;

use super::get;
use crate::db::DbError;
use crate::model::{Run, RunId, RunStatus, TenantId};

/// Cancels run `id`: a pending run becomes `cancelled` now (with its outbox
/// row); a running run is flagged and its worker notified, and the worker stops
/// it (or, if that worker died, the rescuer ends it `cancelled`). A failed or
/// stopped run becomes `cancelled` too: it gives up for good, and lets go of
/// its sequence key so the runs waiting behind it go on. Cancelling a
/// cancelled run is a no-op. Run it in a transaction.
///
/// # Errors
///
/// [`DbError::RunNotFound`], or [`DbError::WrongStatus`] for a succeeded run.
pub async fn cancel(conn: &mut PgConnection, tenant: TenantId, id: RunId) -> Result<Run, DbError> {
    let status = lock_status(conn, tenant, id).await?;
    match status {
        RunStatus::Pending | RunStatus::Failed | RunStatus::StoppedQuota => {
            sqlx::query!(
                r#"
                WITH cancelled AS (
                    UPDATE runs SET status = 'cancelled', finished_at = now(),
                        error = '{"reason": "cancelled", "message": "cancelled by a client"}',
                        sequence_waiting = false,
                        prev_event_txid = last_event_txid, last_event_txid = pg_current_xact_id()
                    WHERE id = $1 RETURNING *
                )
                INSERT INTO outbox (tenant_id, run_id, event_type, queue, status, attempt, max_attempts,
                                run_at, error, result, prev_txid)
                SELECT tenant_id, id, 'run.cancelled',
                       cancelled.queue, cancelled.status, cancelled.attempt, cancelled.max_attempts,
                   cancelled.run_at, cancelled.error, cancelled.result, cancelled.prev_event_txid
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
                needs: "pending, running, failed or stopped_quota",
            })
        }
    }
    get(conn, tenant, id).await
}

/// Puts a failed, stopped or cancelled run back to pending with fresh
/// attempts; it resumes at its first unfinished step. Its lease token is left
/// alone (it only grows), and its attempt history is kept. Run it in a
/// transaction.
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
    retry_where(conn, tenant, RunStatus::Failed, None, None, 1, Some(id)).await?;
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
    // No stored queue name holds `\u0000`: such a filter matches nothing.
    if queue.is_some_and(|q| q.contains('\0')) {
        return Ok(Vec::new());
    }
    retry_where(conn, tenant, status, queue, project_id, limit, None).await
}

/// The one requeue statement: runs of `tenant` in a finished status — `id`
/// alone when given (any finished status), else those in `status` matching
/// the filters — back to pending with attempt 0 and a `run.requeued` row.
async fn retry_where(
    conn: &mut PgConnection,
    tenant: TenantId,
    status: RunStatus,
    queue: Option<&str>,
    project_id: Option<Uuid>,
    limit: i64,
    id: Option<RunId>,
) -> Result<Vec<RunId>, DbError> {
    Ok(sqlx::query_scalar!(
        r#"
        WITH target AS (
            SELECT id FROM runs
            WHERE tenant_id = $1
              AND status IN ('failed', 'stopped_quota', 'cancelled')
              AND CASE WHEN $6::uuid IS NULL
                       THEN status = $2 AND ($3::text IS NULL OR queue = $3)
                            AND ($4::uuid IS NULL OR project_id = $4)
                       ELSE id = $6 END
            ORDER BY id
            LIMIT $5
            FOR UPDATE SKIP LOCKED
        ), requeued AS (
            -- A cancelled keyed run let go of its key: it queues up behind
            -- the key again (the promoter decides when it goes).
            UPDATE runs r SET status = 'pending', attempt = 0, run_at = now(), error = NULL,
                result = NULL, finished_at = NULL, started_at = NULL, cancel_requested = false,
                sequence_waiting = r.sequence_key IS NOT NULL AND r.status = 'cancelled',
                prev_event_txid = r.last_event_txid, last_event_txid = pg_current_xact_id()
            WHERE r.id = ANY(ARRAY(SELECT id FROM target))
            RETURNING r.*
        ), recorded AS (
            INSERT INTO outbox (tenant_id, run_id, event_type, queue, status, attempt, max_attempts,
                                run_at, error, result, prev_txid)
            SELECT tenant_id, id, 'run.requeued', requeued.queue, requeued.status, requeued.attempt, requeued.max_attempts,
                   requeued.run_at, requeued.error, requeued.result, requeued.prev_event_txid
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
        id,
    )
    .fetch_all(&mut *conn)
    .await?)
}
