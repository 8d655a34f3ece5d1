//! Statements on `run_steps` that are not part of a run's state change (those
//! live with the change in [`super::runs`], so they commit together).

use sqlx::PgConnection;

use super::DbError;
use crate::model::{RunId, Step, StepStatus, TenantId};

/// The steps of run `id`, in pipeline order.
///
/// # Errors
///
/// Database errors.
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: RunId,
) -> Result<Vec<Step>, DbError> {
    Ok(sqlx::query_as!(
        Step,
        r#"
        SELECT position, name, kind, input, timeout_seconds, status AS "status: StepStatus",
               attempt, output, error, started_at, finished_at
        FROM run_steps WHERE run_id = $1 AND tenant_id = $2
        ORDER BY position
        "#,
        id,
        tenant,
    )
    .fetch_all(&mut *conn)
    .await?)
}
