//! The statements of the load tool (`runq bench`): emptying the run tables
//! between phases, and reading back what the workers did, on the database's
//! clock. Nothing here runs in production paths, which is why it lives in
//! runq-devtools rather than with the service's SQL in runq-shared. The
//! statements are checked at compile time against the workspace's `.sqlx/`
//! like every other query, except the two built with `query_scalar::<_, T>`,
//! which are checked when they run.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use runq_shared::{DbError, RunId};

/// Empties `runs`, `run_steps`, `run_events` and `outbox` so a phase starts
/// from an empty queue with no dead tuples left by the previous one. Tenants,
/// tokens, projects and the worker registry are kept.
///
/// TRUNCATE, unlike DELETE, leaves no dead rows behind for the next phase to
/// scan over or for autovacuum to clean up while it is being measured.
///
/// # Errors
///
/// Database errors, or a lock timeout if another session holds the tables.
pub async fn reset(conn: &mut PgConnection) -> Result<(), DbError> {
    sqlx::query("TRUNCATE runs, run_steps, run_events, outbox CASCADE")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Refreshes the planner statistics of `runs` and `run_steps`, so a drain is
/// planned for the rows it will meet rather than for an empty table.
///
/// # Errors
///
/// Database errors.
pub async fn analyze(conn: &mut PgConnection) -> Result<(), DbError> {
    sqlx::query("ANALYZE runs, run_steps")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Whether any run lives outside `queues`: the tool truncates the run
/// tables, so it refuses a database that holds someone else's work.
///
/// # Errors
///
/// Database errors.
pub async fn runs_outside_queues(
    conn: &mut PgConnection,
    queues: &[&str],
) -> Result<bool, DbError> {
    let found = sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM runs WHERE queue <> ALL($1::text[]))",
    )
    .bind(queues)
    .fetch_one(&mut *conn)
    .await?;
    Ok(found)
}

/// Runs in `queue`, whatever their status.
///
/// # Errors
///
/// Database errors.
pub async fn runs_count(conn: &mut PgConnection, queue: &str) -> Result<i64, DbError> {
    let count = sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM runs WHERE queue = $1"#,
        queue,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(count)
}

/// Runs in `queue` with status `succeeded`.
///
/// # Errors
///
/// Database errors.
pub async fn runs_succeeded_count(conn: &mut PgConnection, queue: &str) -> Result<i64, DbError> {
    let count = sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM runs WHERE queue = $1 AND status = 'succeeded'"#,
        queue,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(count)
}

/// Whether `queue` still has runs waiting or running. Cheap enough to poll
/// while a worker drains the queue: it reads the head of the pending index
/// and the running-lease index instead of counting the queue's runs.
///
/// # Errors
///
/// Database errors.
pub async fn runs_unfinished(conn: &mut PgConnection, queue: &str) -> Result<bool, DbError> {
    let unfinished = sqlx::query_scalar!(
        // Scalar subqueries ordered as the indexes are: a plan made when every
        // run was pending expects a match on the first page, so an EXISTS
        // (which drops ORDER BY and LIMIT) scans the table from the start,
        // past every run already drained.
        // Each predicate is an index's own, or the planner cannot use it and
        // every check scans the queue (it once cost the drain a quarter).
        r#"SELECT (SELECT true FROM runs
                   WHERE status = 'pending' AND NOT sequence_waiting AND queue = $1
                   ORDER BY queue, priority DESC, tenant_id, run_at, id LIMIT 1) IS NOT NULL
               OR (SELECT true FROM runs WHERE status = 'running' AND queue = $1
                   ORDER BY lease_expires_at LIMIT 1) IS NOT NULL
               OR (SELECT true FROM runs
                   WHERE status = 'pending' AND sequence_waiting AND queue = $1
                   LIMIT 1) IS NOT NULL
               AS "unfinished!""#,
        queue,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(unfinished)
}

/// The database's clock now (`clock_timestamp()`, not the transaction start),
/// to align it with the caller's clock.
///
/// # Errors
///
/// Database errors.
pub async fn clock(conn: &mut PgConnection) -> Result<DateTime<Utc>, DbError> {
    let now = sqlx::query_scalar!(r#"SELECT clock_timestamp() AS "now!""#)
        .fetch_one(&mut *conn)
        .await?;
    Ok(now)
}

/// The earliest `started_at` of the runs in `queue`: when the first one was
/// claimed. `None` when none has started.
///
/// # Errors
///
/// Database errors.
pub async fn runs_first_started_at(
    conn: &mut PgConnection,
    queue: &str,
) -> Result<Option<DateTime<Utc>>, DbError> {
    let first = sqlx::query_scalar!("SELECT min(started_at) FROM runs WHERE queue = $1", queue)
        .fetch_one(&mut *conn)
        .await?;
    Ok(first)
}

/// `started_at` of each run in `ids` that exists, in no particular order;
/// `None` for a run not claimed yet.
///
/// # Errors
///
/// Database errors.
pub async fn runs_started_at(
    conn: &mut PgConnection,
    ids: &[RunId],
) -> Result<Vec<(RunId, Option<DateTime<Utc>>)>, DbError> {
    let rows = sqlx::query!("SELECT id, started_at FROM runs WHERE id = ANY($1)", ids)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.id, row.started_at))
        .collect())
}

/// Whether the worker process `pid` has registered and not stopped: it is
/// past start-up and about to listen for work.
///
/// # Errors
///
/// Database errors.
pub async fn workers_running_with_pid(conn: &mut PgConnection, pid: i32) -> Result<bool, DbError> {
    let found = sqlx::query_scalar!(
        r#"SELECT EXISTS (
               SELECT 1 FROM workers WHERE pid = $1 AND stopped_at IS NULL
           ) AS "found!""#,
        pid,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(found)
}

/// The server's current WAL insert position, in bytes from the start.
///
/// # Errors
///
/// Database errors.
pub async fn wal_position(conn: &mut PgConnection) -> Result<i64, DbError> {
    let position = sqlx::query_scalar::<_, i64>(
        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::int8",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(position)
}
