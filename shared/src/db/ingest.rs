//! Ingest: events sidecars send for a run, and the per-token rate limit
//! they are counted against, shared by every API process through Postgres.
//!
//! The limit is a sliding window of [`WINDOW_SECONDS`] counted in events,
//! not requests, kept in `ingest_usage` as one bucket per token per second of
//! the database clock. [`take`] serialises the requests of one token (not of
//! all tokens) with a transaction-scoped advisory lock, sums the token's
//! buckets in the window, grants what is left of the limit and adds the
//! grant to the current second's bucket; [`ingest`] then inserts the granted
//! events in the same transaction, so a grant and its events commit (or roll
//! back) together. Two API processes therefore never grant the same budget
//! twice: the second waits on the lock and then sees the first's bucket.

use sqlx::PgConnection;
use uuid::Uuid;

use super::{events, runs, DbError};
use crate::model::{IngestEvent, RunId, TenantId};

/// Length of the rate-limit window, in seconds.
pub const WINDOW_SECONDS: i64 = 60;

/// The first key of the two-key advisory locks ingest takes (the second is a
/// hash of the token key). Two-key locks never collide with the one-key
/// locks elsewhere in runq.
const LOCK_CLASS: i32 = 0x696e_6773; // "ings"

/// The state of a token's rate limit after a request, for the
/// `X-RateLimit-*` and `Retry-After` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Events the token may send per window.
    pub limit: u32,
    /// Events it may still send now.
    pub remaining: u32,
    /// Seconds until the oldest events counted in the window leave it (and
    /// `remaining` grows); 0 when the window counts none.
    pub reset_seconds: u32,
}

/// What [`ingest`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ingested {
    /// Events stored: the first `accepted` of the batch.
    pub accepted: u32,
    /// Events the rate limit refused: the rest of the batch.
    pub rejected: u32,
    /// Accepted events stored truncated.
    pub truncated: u32,
    /// The token's limit after the batch.
    pub rate: RateLimit,
}

/// A batch of ingested events and who sends it.
#[derive(Debug, Clone, Copy)]
pub struct IngestBatch<'a> {
    /// The caller's tenant.
    pub tenant: TenantId,
    /// The one project the caller may write to, if its token is bound to one.
    pub project: Option<Uuid>,
    /// Identifies the sending token for the rate limit (stable across
    /// requests and processes; today the SHA-256 of the bearer token).
    pub token_key: &'a [u8],
    /// The run the events belong to.
    pub run_id: RunId,
    /// The events, in order (validated by the caller).
    pub events: &'a [IngestEvent],
    /// Events the token may send per window.
    pub limit: u32,
    /// Seconds after an attempt ends during which its run still takes events.
    pub grace_seconds: i64,
}

/// Stores as many of `batch`'s events as the token's rate limit allows,
/// first to last, under the run's current attempt. Run it in a transaction:
/// the grant and the events commit together, and the token's lock is held
/// until then.
///
/// # Errors
///
/// [`DbError::RunNotFound`] and [`DbError::RunNotIngesting`] (nothing is
/// counted against the limit), database errors.
pub async fn ingest(conn: &mut PgConnection, batch: IngestBatch<'_>) -> Result<Ingested, DbError> {
    let attempt = runs::read::ingest_attempt(
        conn,
        batch.tenant,
        batch.run_id,
        batch.project,
        batch.grace_seconds,
    )
    .await?;
    let wanted = u32::try_from(batch.events.len()).unwrap_or(u32::MAX);
    let (granted, rate) = take(conn, batch.token_key, wanted, batch.limit).await?;
    let truncated = match granted {
        0 => 0,
        n => {
            let taken = &batch.events[..n as usize];
            events::insert_ingested(conn, batch.tenant, batch.run_id, attempt, taken).await?
        }
    };
    Ok(Ingested {
        accepted: granted,
        rejected: wanted - granted,
        truncated,
        rate,
    })
}

/// Grants up to `wanted` events of token `token_key`'s budget of `limit`
/// per window and counts them in the current second's bucket; deletes the
/// token's buckets that left the window. Returns the grant and the limit's
/// state after it. Run it in a transaction: the token's lock is held until
/// the end, so the grant is counted before any other request of the token
/// reads the window.
///
/// # Errors
///
/// Database errors.
pub async fn take(
    conn: &mut PgConnection,
    token_key: &[u8],
    wanted: u32,
    limit: u32,
) -> Result<(u32, RateLimit), DbError> {
    sqlx::query!(
        "SELECT pg_advisory_xact_lock($1, hashtext(encode($2, 'hex')))",
        LOCK_CLASS,
        token_key,
    )
    .execute(&mut *conn)
    .await?;
    // The clock is read after the lock is granted, so buckets are written in
    // the order requests are served. A bucket counts while its second is one
    // of the last WINDOW_SECONDS: bucket `s` leaves at second `s + WINDOW`.
    let window = sqlx::query!(
        r#"
        WITH clock AS (
            SELECT floor(extract(epoch FROM clock_timestamp()))::bigint AS second
        ), pruned AS (
            DELETE FROM ingest_usage u USING clock
            WHERE u.token_key = $1 AND u.second <= clock.second - $2
        )
        SELECT c.second AS "second!", coalesce(sum(u.events), 0)::bigint AS "used!",
               min(u.second) AS oldest
        FROM clock c
        LEFT JOIN ingest_usage u ON u.token_key = $1 AND u.second > c.second - $2
        GROUP BY c.second
        "#,
        token_key,
        WINDOW_SECONDS,
    )
    .fetch_one(&mut *conn)
    .await?;
    let used = u32::try_from(window.used).unwrap_or(u32::MAX);
    let granted = wanted.min(limit.saturating_sub(used));
    if granted > 0 {
        sqlx::query!(
            r#"
            INSERT INTO ingest_usage (token_key, second, events) VALUES ($1, $2, $3)
            ON CONFLICT (token_key, second)
            DO UPDATE SET events = ingest_usage.events + EXCLUDED.events
            "#,
            token_key,
            window.second,
            granted as i32,
        )
        .execute(&mut *conn)
        .await?;
    }
    let oldest = match (window.oldest, granted) {
        (Some(oldest), _) => Some(oldest),
        (None, 0) => None,
        (None, _) => Some(window.second),
    };
    let reset_seconds = oldest
        .map(|oldest| (oldest + WINDOW_SECONDS - window.second).clamp(1, WINDOW_SECONDS) as u32)
        .unwrap_or(0);
    Ok((
        granted,
        RateLimit {
            limit,
            remaining: limit.saturating_sub(used).saturating_sub(granted),
            reset_seconds,
        },
    ))
}
