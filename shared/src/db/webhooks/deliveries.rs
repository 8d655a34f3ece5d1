//! What clients read of deliveries, and redelivery.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::DbError;
use crate::model::{
    Delivery, DeliveryAttempt, DeliveryPage, DeliveryState, EventType, RunEvent, RunId, TenantId,
};

struct Row {
    id: i64,
    event_id: i64,
    event_type: String,
    run_id: RunId,
    state: DeliveryState,
    attempts: i32,
    next_attempt_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

/// Deliveries of subscription `webhook` of `tenant`, newest first: up to
/// `limit` with ids below `before`, only those in `state` when given, each
/// with its attempts.
///
/// # Errors
///
/// [`DbError::WebhookNotFound`], else database errors.
pub async fn list_deliveries(
    conn: &mut PgConnection,
    tenant: TenantId,
    webhook: Uuid,
    state: Option<DeliveryState>,
    before: Option<i64>,
    limit: i64,
) -> Result<DeliveryPage, DbError> {
    super::get(conn, tenant, webhook).await?;
    let mut rows = sqlx::query_as!(
        Row,
        r#"SELECT id, event_id, event_type, run_id, state AS "state: DeliveryState", attempts,
                  next_attempt_at, created_at, finished_at
           FROM webhook_deliveries
           WHERE webhook_id = $1 AND tenant_id = $2
             AND ($3::delivery_state IS NULL OR state = $3)
             AND ($4::bigint IS NULL OR id < $4)
           ORDER BY id DESC LIMIT $5"#,
        webhook,
        tenant,
        state as Option<DeliveryState>,
        before,
        limit + 1,
    )
    .fetch_all(&mut *conn)
    .await?;
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|row| row.id)
    } else {
        None
    };
    let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
    let attempts = sqlx::query!(
        "SELECT delivery_id, attempt, started_at, duration_ms, status_code, error
         FROM webhook_attempts WHERE delivery_id = ANY($1) ORDER BY delivery_id, attempt",
        &ids,
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut log: HashMap<i64, Vec<DeliveryAttempt>> = HashMap::new();
    for attempt in attempts {
        log.entry(attempt.delivery_id)
            .or_default()
            .push(DeliveryAttempt {
                attempt: attempt.attempt,
                started_at: attempt.started_at,
                duration_ms: attempt.duration_ms,
                status_code: attempt.status_code,
                error: attempt.error,
            });
    }
    let deliveries = rows
        .into_iter()
        .filter_map(|row| {
            // Written by the relay from outbox rows, whose types are checked
            // by the contract tests; an unknown one is skipped, not a 500.
            let event_type = EventType::from_name(&row.event_type)?;
            let open = matches!(
                row.state,
                DeliveryState::Pending | DeliveryState::Delivering
            );
            Some(Delivery {
                id: row.id,
                event_id: RunEvent::id_of(row.event_id),
                event_type,
                run_id: row.run_id,
                state: row.state,
                attempts: row.attempts,
                next_attempt_at: open.then_some(row.next_attempt_at),
                created_at: row.created_at,
                finished_at: row.finished_at,
                attempt_log: log.remove(&row.id).unwrap_or_default(),
            })
        })
        .collect();
    Ok(DeliveryPage {
        deliveries,
        next_cursor,
    })
}

/// Makes delivery `id` of subscription `webhook` of `tenant` due now with
/// `attempts` more attempts, unless it is being delivered right now. A
/// delivered one is sent again (the receiver deduplicates on the event id).
///
/// # Errors
///
/// [`DbError::WebhookNotFound`], [`DbError::DeliveryNotFound`],
/// [`DbError::DeliveryInFlight`], else database errors.
pub async fn redeliver(
    conn: &mut PgConnection,
    tenant: TenantId,
    webhook: Uuid,
    id: i64,
    attempts: i32,
) -> Result<(), DbError> {
    super::get(conn, tenant, webhook).await?;
    let row = sqlx::query!(
        r#"WITH target AS (
               SELECT id, state FROM webhook_deliveries
               WHERE id = $1 AND webhook_id = $2 AND tenant_id = $3
               FOR UPDATE
           ), changed AS (
               UPDATE webhook_deliveries d
               SET state = 'pending', next_attempt_at = now(), finished_at = NULL,
                   attempts_allowed = d.attempts + $4
               FROM target WHERE d.id = target.id AND target.state <> 'delivering'
               RETURNING d.id
           )
           SELECT target.state AS "state: DeliveryState",
                  EXISTS (SELECT 1 FROM changed) AS "changed!"
           FROM target"#,
        id,
        webhook,
        tenant,
        attempts,
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(DbError::DeliveryNotFound(id))?;
    if row.changed {
        Ok(())
    } else {
        Err(DbError::DeliveryInFlight(id))
    }
}
