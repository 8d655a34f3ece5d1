//! Retention: deleting finished runs (their steps and events go with them,
//! by foreign key) once they are older than their status's retention, capped
//! by the tenant's `retention_days` quota.
//!
//! The pruner walks `runs` from its oldest id (ids are UUIDv7, so id order
//! is creation order) in small batches and deletes the finished runs of each
//! batch that are past retention: no index beyond the primary key, so
//! finishing a run costs nothing extra, and no statement holds many locks.

use sqlx::PgConnection;

use crate::db::DbError;
use crate::model::{RunId, TenantId};

/// Key of the advisory lock a prune batch takes, so pruners on several
/// workers do not delete the same rows twice.
const PRUNE_LOCK: i64 = 0x7275_6e71_7072_756e; // "runqprun"

/// How long finished runs are kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    /// Seconds a succeeded run is kept after it finished.
    pub succeeded_seconds: f64,
    /// Seconds a failed, stopped or cancelled run is kept after it finished.
    pub failed_seconds: f64,
}

/// What one prune batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneBatch {
    /// Whether this worker held the pruner's lock (false: another is pruning).
    pub led: bool,
    /// Runs deleted.
    pub deleted: u64,
    /// The newest id the batch looked at: where the next batch starts.
    pub last: Option<RunId>,
    /// Whether the batch reached runs too young to be past any retention:
    /// the walk can stop.
    pub done: bool,
}

/// Looks at up to `batch` runs after `after` (oldest first) and deletes the
/// finished ones past retention: `retention` by status, or less where the
/// run's tenant is in `caps` (`retention_days` of tenants that have one).
///
/// # Errors
///
/// Database errors.
pub async fn prune_finished(
    conn: &mut PgConnection,
    after: Option<RunId>,
    batch: i64,
    retention: Retention,
    caps: &[(TenantId, i64)],
) -> Result<PruneBatch, DbError> {
    let (tenants, days): (Vec<TenantId>, Vec<i64>) = caps.iter().copied().unzip();
    let row = sqlx::query!(
        r#"
        WITH led AS (
            SELECT pg_try_advisory_xact_lock($7) AS led
        ), head AS (
            SELECT r.id, r.tenant_id, r.status, r.finished_at, r.created_at, r.sequence_key
            FROM runs r, led
            WHERE led.led AND ($1::uuid IS NULL OR r.id > $1)
            ORDER BY r.id LIMIT $2
        ), doomed AS (
            SELECT h.id, h.finished_at FROM head h
            LEFT JOIN unnest($3::uuid[], $4::int8[]) AS c(tenant_id, days)
                ON c.tenant_id = h.tenant_id
            WHERE h.status IN ('succeeded', 'failed', 'stopped_quota', 'cancelled')
              AND h.finished_at < now() - LEAST(
                  CASE WHEN h.status = 'succeeded' THEN make_interval(secs => $5)
                       ELSE make_interval(secs => $6) END,
                  make_interval(days => c.days::int))
              -- A failed or stopped run holding its sequence key with runs
              -- waiting behind it stays until it is retried or cancelled:
              -- deleting it would let them go unasked.
              AND NOT (h.sequence_key IS NOT NULL
                       AND h.status IN ('failed', 'stopped_quota')
                       AND EXISTS (SELECT 1 FROM runs w
                                   WHERE w.tenant_id = h.tenant_id
                                     AND w.sequence_key = h.sequence_key
                                     AND w.sequence_waiting AND w.status = 'pending'))
        ), deleted AS (
            -- Checked again on the row itself: a run retried since the
            -- snapshot (pending again, or finished anew) is not deleted.
            DELETE FROM runs r WHERE r.id = ANY (ARRAY(SELECT id FROM doomed))
              AND r.status IN ('succeeded', 'failed', 'stopped_quota', 'cancelled')
              AND r.finished_at = (SELECT d.finished_at FROM doomed d WHERE d.id = r.id)
            RETURNING 1
        )
        SELECT (SELECT led FROM led) AS "led!",
               (SELECT count(*) FROM deleted) AS "deleted!",
               (SELECT id FROM head ORDER BY id DESC LIMIT 1) AS last,
               (SELECT count(*) FROM head) AS "looked!",
               coalesce((SELECT max(created_at) FROM head)
                        > now() - make_interval(secs => LEAST($5, $6)), false) AS "young!"
        "#,
        after,
        batch,
        &tenants,
        &days,
        retention.succeeded_seconds,
        retention.failed_seconds,
        PRUNE_LOCK,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(PruneBatch {
        led: row.led,
        deleted: row.deleted as u64,
        last: row.last,
        done: !row.led || row.young || row.looked < batch,
    })
}
