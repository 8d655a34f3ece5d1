//! The `workers` registry: who is running, and since when it was last heard from.

use sqlx::PgConnection;

use super::DbError;
use crate::model::WorkerId;

/// Registers worker `id`.
///
/// # Errors
///
/// Database errors.
pub async fn register(
    conn: &mut PgConnection,
    id: WorkerId,
    hostname: &str,
    pid: i32,
    queues: &[String],
    concurrency: i32,
) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO workers (id, hostname, pid, queues, concurrency) VALUES ($1, $2, $3, $4, $5)",
        id,
        hostname,
        pid,
        queues,
        concurrency,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records that worker `id` is alive.
///
/// # Errors
///
/// Database errors.
pub async fn heartbeat(conn: &mut PgConnection, id: WorkerId) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE workers SET last_heartbeat_at = now() WHERE id = $1",
        id
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Marks worker `id` stopped (graceful exit).
///
/// # Errors
///
/// Database errors.
pub async fn stop(conn: &mut PgConnection, id: WorkerId) -> Result<(), DbError> {
    sqlx::query!(
        "UPDATE workers SET stopped_at = now() WHERE id = $1 AND stopped_at IS NULL",
        id
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Marks workers silent for longer than `stale_ms` as gone; returns how many.
///
/// # Errors
///
/// Database errors.
pub async fn mark_gone(conn: &mut PgConnection, stale_ms: i64) -> Result<u64, DbError> {
    let done = sqlx::query!(
        "UPDATE workers SET stopped_at = now()
         WHERE stopped_at IS NULL AND last_heartbeat_at < now() - $1 * interval '1 millisecond'",
        stale_ms as f64,
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// Advisory lock keys of the maintenance services, one per service.
#[derive(Debug, Clone, Copy)]
#[repr(i64)]
pub enum Service {
    /// The lease rescuer.
    Rescuer = 0x7275_6e71_0001,
}

/// Workers that have not stopped and heartbeated within `stale_ms`, oldest
/// first, each with the runs it holds now.
///
/// # Errors
///
/// Database errors.
pub async fn live(
    conn: &mut PgConnection,
    stale_ms: i64,
) -> Result<Vec<crate::model::WorkerInfo>, DbError> {
    Ok(sqlx::query_as!(
        crate::model::WorkerInfo,
        r#"
        SELECT w.id, w.hostname, w.pid, w.queues, w.concurrency,
               (SELECT count(*) FROM runs r WHERE r.status = 'running' AND r.locked_by = w.id)
                   AS "in_flight!",
               w.started_at, w.last_heartbeat_at
        FROM workers w
        WHERE w.stopped_at IS NULL
          AND w.last_heartbeat_at > now() - make_interval(secs => $1::bigint / 1000.0)
        ORDER BY w.started_at, w.id
        "#,
        stale_ms,
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// A transaction open longer than a threshold somewhere on the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct LongTransaction {
    /// The backend's process id (`pg_terminate_backend` takes it).
    pub pid: i32,
    /// Its database.
    pub database: Option<String>,
    /// Its application name.
    pub application: Option<String>,
    /// `active`, `idle in transaction`, ...
    pub state: Option<String>,
    /// Seconds since the transaction began.
    pub seconds: f64,
    /// Its statement, cut to 200 characters.
    pub query: Option<String>,
}

/// Transactions on the whole cluster open longer than `seconds` that hold
/// back the visibility horizon (they have an xid or a snapshot): they stop
/// vacuum from cleaning the queue's dead rows and hold back the outbox
/// relay and the event streams. Oldest first.
///
/// # Errors
///
/// Database errors.
pub async fn long_transactions(
    conn: &mut PgConnection,
    seconds: f64,
) -> Result<Vec<LongTransaction>, DbError> {
    Ok(sqlx::query_as!(
        LongTransaction,
        r#"
        SELECT pid AS "pid!", datname AS database, application_name AS application, state,
               extract(epoch FROM now() - xact_start)::float8 AS "seconds!",
               left(query, 200) AS query
        FROM pg_stat_activity
        WHERE xact_start < now() - make_interval(secs => $1)
          AND pid <> pg_backend_pid()
          AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)
        ORDER BY xact_start
        "#,
        seconds,
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// What `GET /metrics` reports about the cluster: figures an operator alerts
/// on, each read from the statistics views or an index head, none by
/// counting runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterGauges {
    /// Age of the oldest open transaction that holds back the visibility
    /// horizon (0 when none): past a few minutes, vacuum cannot clean the
    /// queue's dead rows, and the outbox relay and streams stall behind it.
    pub oldest_transaction_seconds: f64,
    /// Dead row versions in `runs` waiting for vacuum.
    pub runs_dead_tuples: i64,
    /// Live rows in `runs`, as the statistics estimate them.
    pub runs_live_tuples: i64,
    /// Workers that heartbeat within the last minute.
    pub live_workers: i64,
}

/// Reads the [`ClusterGauges`].
///
/// # Errors
///
/// Database errors.
pub async fn cluster_gauges(conn: &mut PgConnection) -> Result<ClusterGauges, DbError> {
    Ok(sqlx::query_as!(
        ClusterGauges,
        r#"
        SELECT coalesce((
                   SELECT extract(epoch FROM now() - min(xact_start))::float8
                   FROM pg_stat_activity
                   WHERE pid <> pg_backend_pid()
                     AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)), 0)
                   AS "oldest_transaction_seconds!",
               coalesce((SELECT n_dead_tup FROM pg_stat_user_tables
                         WHERE relid = 'runs'::regclass), 0) AS "runs_dead_tuples!",
               coalesce((SELECT n_live_tup FROM pg_stat_user_tables
                         WHERE relid = 'runs'::regclass), 0) AS "runs_live_tuples!",
               (SELECT count(*) FROM workers
                WHERE stopped_at IS NULL AND last_heartbeat_at > now() - interval '1 minute')
                   AS "live_workers!"
        "#,
    )
    .fetch_one(&mut *conn)
    .await?)
}
