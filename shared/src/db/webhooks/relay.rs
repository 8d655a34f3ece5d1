//! The relay's statements: fan the outbox out into deliveries, claim due
//! deliveries, record each attempt, prune what is finished. Any number of
//! relays (one per worker) run them at once: the fan-out takes turns on the
//! cursor row, claims skip each other's rows.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::DbError;
use crate::db::outbox::{Cursor, OUTBOX_CHANNEL};
use crate::model::RunId;

/// What one fan-out pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FanOut {
    /// Whether this relay held the cursor (false: another relay was moving it).
    pub led: bool,
    /// Outbox rows the cursor moved past.
    pub events: i64,
    /// Deliveries created for them.
    pub deliveries: i64,
    /// The cursor afterwards.
    pub cursor: Cursor,
}

/// Moves the webhook cursor past up to `batch` outbox rows below the
/// visibility horizon, creating one delivery (allowed `attempts` attempts)
/// for each row and each enabled subscription of the row's tenant whose
/// topics match, in the same transaction as the move, and notifies
/// [`OUTBOX_CHANNEL`] when the cursor moved. When no subscription is enabled
/// at all, the cursor jumps to the horizon without reading the rows between.
///
/// Run it in a transaction: the cursor row stays locked until it ends, and
/// the deliveries commit with the move or not at all.
///
/// # Errors
///
/// Database errors.
pub async fn fan_out(
    conn: &mut PgConnection,
    batch: i64,
    attempts: i32,
) -> Result<FanOut, DbError> {
    let Some(at) = sqlx::query!(
        r#"SELECT txid::text::bigint AS "txid!", id FROM outbox_cursors
           WHERE name = 'webhooks' FOR UPDATE SKIP LOCKED"#
    )
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(FanOut::default());
    };
    let at = Cursor {
        txid: at.txid,
        id: at.id,
    };
    // One statement, so the check for subscriptions and the horizon share a
    // snapshot: an event committed after a subscription was is never skipped.
    let moved = sqlx::query!(
        r#"WITH subscribed AS (
               SELECT EXISTS (SELECT 1 FROM webhooks WHERE enabled) AS any
           ), batch AS (
               SELECT o.txid, o.id, o.tenant_id, o.run_id, o.event_type,
                      runq_outbox_event(o) AS payload
               FROM outbox o, subscribed s
               WHERE s.any
                 AND (o.txid, o.id) > ($1::bigint::text::xid8, $2)
                 AND o.txid < pg_snapshot_xmin(pg_current_snapshot())
               ORDER BY o.txid, o.id
               LIMIT $3
           ), fanned AS (
               INSERT INTO webhook_deliveries
                   (webhook_id, tenant_id, run_id, event_id, event_type, payload,
                    attempts_allowed)
               SELECT w.id, b.tenant_id, b.run_id, b.id, b.event_type, b.payload, $4
               FROM batch b
               JOIN webhooks w ON w.tenant_id = b.tenant_id AND w.enabled
                    AND (cardinality(w.topics) = 0 OR b.event_type = ANY (w.topics))
               ORDER BY b.txid, b.id, w.id
               ON CONFLICT (webhook_id, event_id) DO NOTHING
               RETURNING 1
           ), last_read AS (
               SELECT txid, id FROM batch ORDER BY txid DESC, id DESC LIMIT 1
           ), jump AS (
               SELECT o.txid, o.id FROM outbox o, subscribed s
               WHERE NOT s.any AND o.txid < pg_snapshot_xmin(pg_current_snapshot())
                 AND (o.txid, o.id) > ($1::bigint::text::xid8, $2)
               ORDER BY o.txid DESC, o.id DESC LIMIT 1
           ), target AS (
               SELECT txid, id FROM last_read UNION ALL SELECT txid, id FROM jump
           )
           SELECT (SELECT count(*) FROM batch) AS "events!",
                  (SELECT count(*) FROM fanned) AS "deliveries!",
                  (SELECT txid::text::bigint FROM target) AS txid,
                  (SELECT id FROM target) AS id"#,
        at.txid,
        at.id,
        batch,
        attempts,
    )
    .fetch_one(&mut *conn)
    .await?;
    let (Some(txid), Some(id)) = (moved.txid, moved.id) else {
        return Ok(FanOut {
            led: true,
            cursor: at,
            ..FanOut::default()
        });
    };
    let cursor = Cursor { txid, id };
    sqlx::query!(
        "UPDATE outbox_cursors SET txid = $1::bigint::text::xid8, id = $2, updated_at = now()
         WHERE name = 'webhooks'",
        cursor.txid,
        cursor.id,
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
        .execute(&mut *conn)
        .await?;
    Ok(FanOut {
        led: true,
        events: moved.events,
        deliveries: moved.deliveries,
        cursor,
    })
}

/// A delivery a relay claimed: send it, then [`record`] the attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The delivery.
    pub id: i64,
    /// Its subscription.
    pub webhook_id: Uuid,
    /// Where to send it.
    pub url: String,
    /// The subscription's signing secret.
    pub secret: String,
    /// The outbox row's id (the event id is `evt_<event_id>`).
    pub event_id: i64,
    /// The run it is about.
    pub run_id: RunId,
    /// The outbox payload.
    pub payload: Value,
    /// This attempt's number: the fence of [`record`].
    pub attempt: i32,
    /// When this attempt's lease ends (another relay may then take it).
    pub lease_expires_at: DateTime<Utc>,
}

/// Claims up to `limit` due deliveries for `lease_ms` milliseconds each: at
/// most one per subscription and run, the earliest unfinished event of that
/// run (so a run's events arrive in order), and no more per subscription
/// than leave it `per_webhook` attempts in flight across all relays (so a
/// receiver that hangs holds only that many senders).
///
/// # Errors
///
/// Database errors.
pub async fn claim(
    conn: &mut PgConnection,
    limit: i64,
    per_webhook: i64,
    lease_ms: i64,
) -> Result<Vec<Claimed>, DbError> {
    let rows = sqlx::query!(
        r#"WITH due AS (
               SELECT d.id, d.webhook_id FROM webhook_deliveries d
               WHERE d.state IN ('pending', 'delivering') AND d.next_attempt_at <= now()
                 AND NOT EXISTS (
                     SELECT 1 FROM webhook_deliveries e
                     WHERE e.webhook_id = d.webhook_id AND e.run_id = d.run_id
                       AND e.event_id < d.event_id AND e.state IN ('pending', 'delivering'))
               ORDER BY d.next_attempt_at, d.id
               LIMIT $1::bigint * 4
               FOR UPDATE SKIP LOCKED
           ), ranked AS (
               SELECT due.id,
                      row_number() OVER (PARTITION BY due.webhook_id ORDER BY due.id) AS n,
                      (SELECT count(*) FROM webhook_deliveries f
                       WHERE f.webhook_id = due.webhook_id AND f.state = 'delivering'
                         AND f.next_attempt_at > now()) AS busy
               FROM due
           ), picked AS (
               SELECT id FROM ranked WHERE n + busy <= $2 ORDER BY id LIMIT $1
           )
           UPDATE webhook_deliveries d
           SET state = 'delivering', attempts = d.attempts + 1,
               next_attempt_at = now() + make_interval(secs => $3::bigint / 1000.0)
           FROM webhooks w
           WHERE d.id = ANY (ARRAY(SELECT id FROM picked)) AND w.id = d.webhook_id
           RETURNING d.id, d.webhook_id, w.url, w.secret, d.event_id, d.run_id, d.payload,
                     d.attempts, d.next_attempt_at"#,
        limit,
        per_webhook,
        lease_ms,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| Claimed {
            id: row.id,
            webhook_id: row.webhook_id,
            url: row.url,
            secret: row.secret,
            event_id: row.event_id,
            run_id: row.run_id,
            payload: row.payload,
            attempt: row.attempts,
            lease_expires_at: row.next_attempt_at,
        })
        .collect())
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    /// When it was sent.
    pub started_at: DateTime<Utc>,
    /// How long it took.
    pub duration_ms: i32,
    /// The reply's status, if one came.
    pub status_code: Option<i32>,
    /// Why it failed; `None` for a delivered event.
    pub error: Option<String>,
}

/// Where a recorded attempt left its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Delivered.
    Delivered,
    /// Failed; due again after a backoff.
    Retrying,
    /// Failed with no attempts left.
    Dead,
    /// The attempt's lease had ended and another relay took the delivery:
    /// the attempt is logged, the delivery's state is the new sender's.
    Superseded,
}

/// Records attempt `claimed.attempt` of a delivery: the attempt's log row,
/// and, if the attempt still holds the delivery, its new state (failures are
/// due again after `runq_backoff(attempt, backoff_base_ms, backoff_max_ms)`).
///
/// # Errors
///
/// Database errors.
pub async fn record(
    conn: &mut PgConnection,
    claimed: &Claimed,
    result: &AttemptResult,
    backoff_base_ms: f64,
    backoff_max_ms: f64,
) -> Result<Recorded, DbError> {
    let delivered = result.error.is_none();
    let row = sqlx::query!(
        r#"WITH logged AS (
               INSERT INTO webhook_attempts
                   (delivery_id, attempt, started_at, duration_ms, status_code, error)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (delivery_id, attempt) DO NOTHING
           ), changed AS (
               UPDATE webhook_deliveries d
               SET state = CASE WHEN $7 THEN 'delivered'::delivery_state
                                WHEN d.attempts >= d.attempts_allowed THEN 'dead'
                                ELSE 'pending' END,
                   next_attempt_at = CASE WHEN $7 OR d.attempts >= d.attempts_allowed
                                          THEN d.next_attempt_at
                                          ELSE now() + runq_backoff(d.attempts, $8, $9) END,
                   finished_at = CASE WHEN $7 OR d.attempts >= d.attempts_allowed
                                      THEN now() END
               WHERE d.id = $1 AND d.state = 'delivering' AND d.attempts = $2
               RETURNING d.state
           )
           SELECT (SELECT state FROM changed) AS "state: crate::model::DeliveryState""#,
        claimed.id,
        claimed.attempt,
        result.started_at,
        result.duration_ms,
        result.status_code,
        result.error,
        delivered,
        backoff_base_ms,
        backoff_max_ms,
    )
    .fetch_one(&mut *conn)
    .await?;
    use crate::model::DeliveryState as S;
    Ok(match row.state {
        Some(S::Delivered) => Recorded::Delivered,
        Some(S::Dead) => Recorded::Dead,
        Some(_) => Recorded::Retrying,
        None => Recorded::Superseded,
    })
}

/// Deletes up to `batch` delivered or dead deliveries (with their attempts)
/// that finished more than `retention_seconds` ago; returns how many.
///
/// # Errors
///
/// Database errors.
pub async fn prune(
    conn: &mut PgConnection,
    retention_seconds: f64,
    batch: i64,
) -> Result<u64, DbError> {
    let done = sqlx::query!(
        "DELETE FROM webhook_deliveries WHERE id = ANY (ARRAY(
             SELECT id FROM webhook_deliveries
             WHERE finished_at < now() - make_interval(secs => $1)
             ORDER BY finished_at LIMIT $2))",
        retention_seconds,
        batch,
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}
