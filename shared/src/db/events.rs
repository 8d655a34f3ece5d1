//! Reads of `run_events`. Events are written with the checkpoint or completion
//! of the step that recorded them ([`super::runs`]), fenced like every worker write.

use sqlx::PgConnection;

use super::DbError;
use crate::model::{Event, RunId, TenantId};

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
        SELECT id, attempt, position, kind, data, created_at
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
