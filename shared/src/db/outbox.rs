//! The outbox: an append-only log of every state change of every run.
//! Rows are written by the statement that changes the run's state
//! ([`super::runs`]); this module reads them by cursor, for the webhook
//! relay and the event streams, and prunes what every consumer has passed.
//!
//! # Order and the visibility horizon
//!
//! A cursor walks the log in `(txid, id)` order: the writing transaction's
//! id, then the row's. Row ids are handed out at insert, so a row with a lower
//! id can commit after a higher one; a reader that moved past it would never
//! see it. Readers therefore take only rows whose transaction is older than
//! every transaction still running (`txid < pg_snapshot_xmin(...)`): no row
//! can appear behind such a cursor later. The price is latency: a transaction
//! left open anywhere in the cluster holds every reader back until it ends
//! (docs/adr/0004-outbox-cursor-and-webhooks.md).

use std::fmt;
use std::str::FromStr;

use sqlx::types::Json;
use sqlx::PgConnection;

use super::DbError;
use crate::model::{OutboxEvent, RunEvent, RunId, TenantId};

/// The channel a relay notifies (empty payload) when it moved its cursor:
/// new rows are readable. Stream readers listen on it and poll as a fallback.
pub const OUTBOX_CHANNEL: &str = "runq_outbox";

/// A position in the log: `(txid, id)` of the last row read. Its text form,
/// `<txid>-<id>`, is the `id` of every event on the streams, so a client's
/// `Last-Event-ID` resumes right after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Cursor {
    /// The writing transaction's id (`xid8`).
    pub txid: i64,
    /// The row's id.
    pub id: i64,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.txid, self.id)
    }
}

/// A cursor that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "'{0}' is not an event stream position (expected '<txid>-<id>', two non-negative integers)"
)]
pub struct BadCursor(pub String);

impl FromStr for Cursor {
    type Err = BadCursor;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadCursor(text.chars().take(64).collect());
        let (txid, id) = text.split_once('-').ok_or_else(bad)?;
        let txid: i64 = txid.parse().map_err(|_| bad())?;
        let id: i64 = id.parse().map_err(|_| bad())?;
        if txid < 0 || id < 0 {
            return Err(bad());
        }
        Ok(Cursor { txid, id })
    }
}

/// An outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Where it sits in the log.
    pub cursor: Cursor,
    /// The run it is about.
    pub run_id: RunId,
    /// `run.created`, `run.started`, ...
    pub event_type: String,
    /// The payload, as relays deliver it.
    pub payload: OutboxEvent,
}

/// An outbox row as read.
struct Row {
    txid: i64,
    id: i64,
    run_id: RunId,
    event_type: String,
    payload: Json<OutboxEvent>,
}

impl From<Row> for OutboxRow {
    fn from(row: Row) -> Self {
        OutboxRow {
            cursor: Cursor {
                txid: row.txid,
                id: row.id,
            },
            run_id: row.run_id,
            event_type: row.event_type,
            payload: row.payload.0,
        }
    }
}

impl OutboxRow {
    /// The row's published form: the webhook body and the stream's `data`.
    pub fn published(&self) -> RunEvent {
        RunEvent::from_outbox(self.cursor.id, self.payload.clone())
    }
}

/// The outbox rows of run `id`, in the order they were written. A run's
/// rows are written by transactions that hold the run's row lock from before
/// the insert until commit, so their ids follow commit order. They are found
/// through the run's chain (`runq_run_outbox`, migration 14): a run already
/// pruned has none left to find (rows written before that migration are
/// found by run whatever happened to it).
///
/// # Errors
///
/// Database errors, or a payload that does not deserialise into
/// [`OutboxEvent`] (a broken contract).
pub async fn for_run(conn: &mut PgConnection, id: RunId) -> Result<Vec<OutboxRow>, DbError> {
    for_run_after(conn, id, 0).await
}

/// The outbox rows of run `id` with ids above `after`, oldest first.
///
/// # Errors
///
/// As [`for_run`].
pub async fn for_run_after(
    conn: &mut PgConnection,
    id: RunId,
    after: i64,
) -> Result<Vec<OutboxRow>, DbError> {
    let rows = sqlx::query_as!(
        Row,
        r#"SELECT txid::text::bigint AS "txid!", id AS "id!", run_id AS "run_id!",
                  event_type AS "event_type!",
                  runq_outbox_event(outbox) AS "payload!: Json<OutboxEvent>"
           FROM runq_run_outbox($1, (SELECT last_event_txid FROM runs WHERE id = $1), $2)
                AS outbox
           ORDER BY id"#,
        id,
        after,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(OutboxRow::from).collect())
}

/// Up to `limit` rows after `after`, below the visibility horizon, in log
/// order; only `tenant`'s when given.
///
/// # Errors
///
/// As [`for_run`].
pub async fn read_after(
    conn: &mut PgConnection,
    after: Cursor,
    tenant: Option<TenantId>,
    limit: i64,
) -> Result<Vec<OutboxRow>, DbError> {
    let rows = sqlx::query_as!(
        Row,
        r#"SELECT txid::text::bigint AS "txid!", id, run_id, event_type,
                  runq_outbox_event(outbox) AS "payload!: Json<OutboxEvent>"
           FROM outbox
           WHERE (txid, id) > ($1::bigint::text::xid8, $2)
             AND txid < pg_snapshot_xmin(pg_current_snapshot())
             AND ($3::uuid IS NULL OR tenant_id = $3)
           ORDER BY txid, id
           LIMIT $4"#,
        after.txid,
        after.id,
        tenant,
        limit,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(OutboxRow::from).collect())
}

/// The position of the newest row below the visibility horizon (the start
/// for a reader that wants only what comes next), or the log's start when it
/// holds none.
///
/// # Errors
///
/// Database errors.
pub async fn head(conn: &mut PgConnection) -> Result<Cursor, DbError> {
    let row = sqlx::query!(
        r#"SELECT txid::text::bigint AS "txid!", id FROM outbox
           WHERE txid < pg_snapshot_xmin(pg_current_snapshot())
           ORDER BY txid DESC, id DESC LIMIT 1"#
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row
        .map(|row| Cursor {
            txid: row.txid,
            id: row.id,
        })
        .unwrap_or_default())
}

/// Deletes up to `batch` of the oldest rows that are older than
/// `retention_seconds` and that the webhook relay has passed; returns how
/// many. Only the head of the log is looked at, so a pass costs the same
/// however long the log is.
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
        r#"DELETE FROM outbox o
           USING (SELECT txid, id FROM outbox ORDER BY txid, id LIMIT $1) head,
                 outbox_cursors c
           WHERE o.txid = head.txid AND o.id = head.id AND c.name = 'webhooks'
             AND (o.txid, o.id) <= (c.txid, c.id)
             AND o.created_at < now() - make_interval(secs => $2)"#,
        batch,
        retention_seconds,
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}
