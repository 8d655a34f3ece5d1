//! Reads of the outbox. Rows are written by the statement that changes the
//! run's state ([`super::runs`]); this module is for relays and audits.

use sqlx::types::Json;
use sqlx::PgConnection;

use super::DbError;
use crate::model::{OutboxEvent, RunId};

/// An outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Delivery order.
    pub id: i64,
    /// The run it is about.
    pub run_id: RunId,
    /// `run.created`, `run.started`, ...
    pub event_type: String,
    /// The payload, as relays deliver it.
    pub payload: OutboxEvent,
}

/// The outbox rows of run `id`, in the order they were written.
///
/// # Errors
///
/// Database errors, or a payload that does not deserialise into
/// [`OutboxEvent`] (a broken contract).
pub async fn for_run(conn: &mut PgConnection, id: RunId) -> Result<Vec<OutboxRow>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT id, run_id, event_type, payload AS "payload: Json<OutboxEvent>"
           FROM outbox WHERE run_id = $1 ORDER BY id"#,
        id,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| OutboxRow {
            id: row.id,
            run_id: row.run_id,
            event_type: row.event_type,
            payload: row.payload.0,
        })
        .collect())
}
