//! The statements of the soak phase of the load tool (`runq bench --phases
//! soak`): how much work is still queued, and how big and how dead the hot
//! tables and their indexes are. Plain (unchecked) queries over the
//! statistics views, which `.sqlx/` need not describe; index names are read
//! from the catalog, never written here, so a new or renamed index is
//! measured like the rest.

use sqlx::PgConnection;

use runq_shared::DbError;

/// The tables whose churn the soak watches: everything a run writes.
pub const HOT_TABLES: [&str; 5] = [
    "runs",
    "run_steps",
    "outbox",
    "run_events",
    "webhook_deliveries",
];

/// Runs of one queue still to be finished.
#[derive(Debug, Clone, Copy, Default)]
pub struct Backlog {
    /// Waiting to be claimed.
    pub pending: i64,
    /// Claimed (executing, or prefetched by a worker).
    pub running: i64,
}

/// Counts the pending and running runs of `queue`. Each count reads one
/// partial index, so it costs what the backlog is, not what the table holds.
///
/// # Errors
///
/// Database errors.
pub async fn backlog(conn: &mut PgConnection, queue: &str) -> Result<Backlog, DbError> {
    let (pending, running): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM runs WHERE status = 'pending' AND queue = $1),
                (SELECT count(*) FROM runs WHERE status = 'running' AND queue = $1)",
    )
    .bind(queue)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Backlog { pending, running })
}

/// Size and vacuum state of one table.
#[derive(Debug, Clone, Default)]
pub struct TableStats {
    /// The table's name.
    pub name: String,
    /// Heap, TOAST and every index, in bytes (`pg_total_relation_size`).
    pub total_bytes: i64,
    /// The heap alone, in bytes.
    pub heap_bytes: i64,
    /// Live rows, as the statistics collector last counted them.
    pub live_tuples: i64,
    /// Dead rows not yet vacuumed away.
    pub dead_tuples: i64,
    /// Autovacuum passes over the table since the statistics were reset.
    pub autovacuum_count: i64,
    /// Autoanalyze passes.
    pub autoanalyze_count: i64,
}

/// [`TableStats`] of each table in `tables` that exists, in that order.
///
/// # Errors
///
/// Database errors.
pub async fn table_stats(
    conn: &mut PgConnection,
    tables: &[&str],
) -> Result<Vec<TableStats>, DbError> {
    let names: Vec<String> = tables.iter().map(|&t| t.to_owned()).collect();
    let rows: Vec<(String, i64, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT t.name,
                pg_total_relation_size(c.oid),
                pg_relation_size(c.oid),
                coalesce(s.n_live_tup, 0),
                coalesce(s.n_dead_tup, 0),
                coalesce(s.autovacuum_count, 0),
                coalesce(s.autoanalyze_count, 0)
         FROM unnest($1::text[]) WITH ORDINALITY AS t(name, ord)
         JOIN pg_class c ON c.oid = to_regclass(t.name)
         LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
         ORDER BY t.ord",
    )
    .bind(&names)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(name, total_bytes, heap_bytes, live, dead, vacuums, analyzes)| TableStats {
                name,
                total_bytes,
                heap_bytes,
                live_tuples: live,
                dead_tuples: dead,
                autovacuum_count: vacuums,
                autoanalyze_count: analyzes,
            },
        )
        .collect())
}

/// The name and size in bytes of every index of `table`, by name.
///
/// # Errors
///
/// Database errors.
pub async fn index_sizes(
    conn: &mut PgConnection,
    table: &str,
) -> Result<Vec<(String, i64)>, DbError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT i.relname::text, pg_relation_size(i.oid)
         FROM pg_index x
         JOIN pg_class i ON i.oid = x.indexrelid
         WHERE x.indrelid = to_regclass($1)
         ORDER BY i.relname",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows)
}

/// The storage parameters (`reloptions`) set on `table`, such as
/// `fillfactor=70` or `autovacuum_vacuum_scale_factor=0.01`; empty when
/// every one is at the server's default.
///
/// # Errors
///
/// Database errors.
pub async fn reloptions(conn: &mut PgConnection, table: &str) -> Result<Vec<String>, DbError> {
    let options: Option<Vec<String>> =
        sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE oid = to_regclass($1)")
            .bind(table)
            .fetch_optional(&mut *conn)
            .await?
            .flatten();
    Ok(options.unwrap_or_default())
}

/// The server settings that bound how often and how fast autovacuum runs
/// (`autovacuum_naptime` and the like), as `name=value` words, so a soak's
/// figures say what they were measured under.
///
/// # Errors
///
/// Database errors.
pub async fn autovacuum_settings(conn: &mut PgConnection) -> Result<Vec<String>, DbError> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT name || '=' || setting || coalesce(unit, '')
         FROM pg_settings
         WHERE name IN ('autovacuum', 'autovacuum_naptime', 'autovacuum_max_workers',
                        'autovacuum_vacuum_cost_delay', 'autovacuum_vacuum_cost_limit',
                        'vacuum_cost_limit', 'shared_buffers')
         ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|(setting,)| setting).collect())
}
