//! `run_events`: reads, and the inserts of ingested events. Events a step
//! records are written with the checkpoint or completion of that step
//! ([`super::runs`]), fenced like every worker write; events a sidecar sends
//! are written by [`insert_ingested`], under the rate limit of
//! [`super::ingest`].
//!
//! Every writer must have its transaction id (have locked or written a row)
//! before it inserts events: a run's live stream passes an event id only
//! once every transaction that could still commit a lower one has ended,
//! and it can only see those by their ids ([`super::runs::stream`]).

use sqlx::PgConnection;

use super::DbError;
use crate::model::{Event, IngestEvent, RunId, TenantId};

/// Events of run `id` after event id `after`, oldest first, at most `limit`.
///
/// # Errors
///
/// Database errors.
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: RunId,
    after: i64,
    limit: i64,
) -> Result<Vec<Event>, DbError> {
    Ok(sqlx::query_as!(
        Event,
        r#"
        SELECT id, attempt, position, kind, data, truncated, occurred_at, created_at
        FROM run_events
        WHERE run_id = $1 AND tenant_id = $2 AND id > $3
        ORDER BY id
        LIMIT $4
        "#,
        id,
        tenant,
        after,
        limit,
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Inserts `events` for attempt `attempt` of run `run` (no step: `position`
/// NULL), in order, with one statement. Each event's data is stored
/// truncated when over 64 KB ([`crate::model::truncate_event_data`]).
/// Returns how many were stored truncated. Run it in a transaction that has
/// written already ([`super::ingest::ingest`] charges the rate limit
/// first), so it holds a transaction id (see the module doc).
///
/// # Errors
///
/// Database errors.
pub async fn insert_ingested(
    conn: &mut PgConnection,
    tenant: TenantId,
    run: RunId,
    attempt: i32,
    events: &[IngestEvent],
) -> Result<u32, DbError> {
    let mut kinds = Vec::with_capacity(events.len());
    let mut data = Vec::with_capacity(events.len());
    let mut truncated = Vec::with_capacity(events.len());
    let mut occurred = Vec::with_capacity(events.len());
    for event in events {
        kinds.push(event.kind.clone());
        match crate::model::truncate_event_data(&event.data) {
            Some(cut) => {
                data.push(cut);
                truncated.push(true);
            }
            None => {
                data.push(event.data.clone());
                truncated.push(false);
            }
        }
        occurred.push(event.occurred_at);
    }
    sqlx::query!(
        r#"
        INSERT INTO run_events (run_id, tenant_id, attempt, position, kind, data, truncated,
                                occurred_at)
        SELECT $1, $2, $3, NULL, e.kind, e.data, e.truncated, e.occurred_at
        FROM unnest($4::text[], $5::jsonb[], $6::bool[], $7::timestamptz[])
             WITH ORDINALITY AS e(kind, data, truncated, occurred_at, n)
        ORDER BY e.n
        "#,
        run,
        tenant,
        attempt,
        &kinds,
        &data,
        &truncated,
        &occurred as &[Option<chrono::DateTime<chrono::Utc>>],
    )
    .execute(&mut *conn)
    .await?;
    Ok(truncated.iter().filter(|t| **t).count() as u32)
}

/// First key of the per-tenant advisory lock a trim takes, so trimmers on
/// several workers do not delete the same rows twice.
const TRIM_LOCK_SPACE: i32 = 0x7472_696d; // "trim"

/// Deletes up to `batch` of `tenant`'s oldest events beyond its newest
/// `keep` (the `stored_events` quota: the oldest roll off). Returns how many
/// went; fewer than `batch` means the tenant is within `keep`, or another
/// worker is trimming it right now.
///
/// # Errors
///
/// Database errors.
pub async fn trim_oldest(
    conn: &mut PgConnection,
    tenant: TenantId,
    keep: i64,
    batch: i64,
) -> Result<u64, DbError> {
    let done = sqlx::query!(
        r#"
        WITH led AS (
            SELECT pg_try_advisory_xact_lock($4, hashtext($1::uuid::text)) AS led
        ), boundary AS (
            SELECT id FROM run_events WHERE tenant_id = $1 AND (SELECT led FROM led)
            ORDER BY id DESC OFFSET $2 LIMIT 1
        )
        DELETE FROM run_events WHERE id = ANY (ARRAY(
            SELECT e.id FROM run_events e, boundary b
            WHERE e.tenant_id = $1 AND e.id <= b.id
            ORDER BY e.id LIMIT $3))
        "#,
        tenant,
        keep,
        batch,
        TRIM_LOCK_SPACE,
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}
