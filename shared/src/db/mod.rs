//! The database layer: all of runq's SQL, one module per table family.
//!
//! Functions take `&mut PgConnection` (a connection or an open transaction) so
//! that a state change and its outbox row commit together: the caller decides
//! where the transaction begins and ends.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub mod audit;
pub mod events;
pub mod ingest;
pub mod outbox;
pub mod projects;
pub mod queues;
pub mod quotas;
pub mod runs;
pub mod schedules;
pub mod sequences;
pub mod steps;
pub mod tenants;
pub mod tokens;
pub mod webhooks;
pub mod workers;

/// The embedded migrations under `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The channel the enqueue transaction notifies when runs become claimable.
pub const PENDING_CHANNEL: &str = "runq_pending";
/// The channel a cancel of a running run notifies, with the run id as payload.
pub const CANCEL_CHANNEL: &str = "runq_cancel";

/// Errors of the database layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No run with this id is visible to the tenant.
    #[error("run {0} not found")]
    RunNotFound(uuid::Uuid),
    /// The run is not in a status that allows the operation.
    #[error("run {id} is {status}; {operation} needs {needs}")]
    WrongStatus {
        /// The run.
        id: uuid::Uuid,
        /// Its current status.
        status: &'static str,
        /// What was attempted.
        operation: &'static str,
        /// Which statuses allow it.
        needs: &'static str,
    },
    /// The run takes no ingested events now: it is not running and its
    /// latest attempt did not end within the grace window.
    #[error("run {id} is {status}{}; events are accepted while a run is running and for {grace_seconds} s after an attempt ends", ended_words(*.ended_seconds_ago))]
    RunNotIngesting {
        /// The run.
        id: uuid::Uuid,
        /// Its current status.
        status: &'static str,
        /// Seconds since its latest attempt ended, if one did.
        ended_seconds_ago: Option<i64>,
        /// The grace window, in seconds.
        grace_seconds: i64,
    },
    /// The referenced project does not exist for this tenant.
    #[error("project {0} not found")]
    ProjectNotFound(uuid::Uuid),
    /// A run names a `prod` project whose production override is off.
    #[error(
        "project '{name}' ({id}) is a prod project and its production override is off, so \
         runs against it are refused; an admin token can turn the override on with \
         POST /v1/projects/{id}/production-override and the three confirmations"
    )]
    ProductionRefused {
        /// The project.
        id: uuid::Uuid,
        /// Its name.
        name: String,
    },
    /// Another project of the tenant has this name.
    #[error("a project named '{0}' already exists")]
    ProjectNameTaken(String),
    /// No token with this id is visible to the tenant.
    #[error("token {0} not found")]
    TokenNotFound(uuid::Uuid),
    /// No schedule with this id is visible to the tenant.
    #[error("schedule {0} not found")]
    ScheduleNotFound(uuid::Uuid),
    /// Another schedule of the tenant has this name.
    #[error("a schedule named '{0}' already exists")]
    ScheduleNameTaken(String),
    /// No webhook subscription with this id is visible to the tenant.
    #[error("webhook {0} not found")]
    WebhookNotFound(uuid::Uuid),
    /// The tenant has as many webhook subscriptions as it may.
    #[error("a tenant may have at most {0} webhook subscriptions; delete one first")]
    TooManyWebhooks(i64),
    /// No delivery with this id belongs to the subscription.
    #[error("delivery {0} not found")]
    DeliveryNotFound(i64),
    /// The delivery is being sent right now.
    #[error("delivery {0} is being sent right now; redeliver it after this attempt ends")]
    DeliveryInFlight(i64),
    /// No tenant has this name.
    #[error("tenant '{0}' not found")]
    TenantNotFound(String),
    /// An idempotency key was used before by a different request.
    #[error("idempotency key '{0}' was already used with different parameters; use a new key for a new request")]
    IdempotencyMismatch(String),
    /// A tenant's quota refuses the request: nothing was written.
    #[error("{}", quota_message(*.quota, *.limit, *.used, *.requested, *.resets_at))]
    QuotaExceeded {
        /// Which quota.
        quota: crate::quotas::Quota,
        /// The tenant's effective limit.
        limit: i64,
        /// Current use, before this request.
        used: i64,
        /// What this request would have added.
        requested: i64,
        /// When enough use leaves the window for the request to fit (rates
        /// only; `None` for hard caps and for a request larger than the limit).
        resets_at: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// The input was refused before it reached the database.
    #[error(transparent)]
    Invalid(#[from] crate::model::InvalidRun),
    /// Postgres or the connection failed.
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    /// Migrations could not be applied.
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

fn ended_words(ended_seconds_ago: Option<i64>) -> String {
    match ended_seconds_ago {
        Some(seconds) => format!(" and its latest attempt ended {seconds} s ago"),
        None => String::new(),
    }
}

impl DbError {
    /// Whether the error means the database cannot be reached right now (as
    /// opposed to a bad statement or bad data): callers answer 503 and retry.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Sqlx(err) => is_unavailable(err),
            _ => false,
        }
    }
}

fn quota_message(
    quota: crate::quotas::Quota,
    limit: i64,
    used: i64,
    requested: i64,
    resets_at: Option<chrono::DateTime<chrono::Utc>>,
) -> String {
    let name = quota.as_str();
    let head =
        format!("quota {name} exceeded: limit {limit}, used {used}, this request adds {requested}");
    match (quota.is_rate(), resets_at) {
        (true, Some(at)) => format!("{head}; enough frees up at {}", at.to_rfc3339()),
        (true, None) => {
            format!("{head}; the request alone exceeds the limit, split it or raise the quota")
        }
        (false, _) => format!("{head}; remove some or ask an admin to raise the quota"),
    }
}

/// Whether `err` means the database cannot be reached right now.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => true,
        // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            Some("57P01" | "57P02" | "57P03" | "53300" | "08000" | "08003" | "08006")
        ),
        _ => false,
    }
}

/// Opens a pool of at most `max_connections` to `url`. `acquire_timeout` bounds
/// how long a caller waits for a connection, so exhaustion fails fast.
///
/// # Errors
///
/// The URL does not parse. Connections are made lazily, so an unreachable
/// server is reported by the first query, not here.
pub fn pool(url: &str, max_connections: u32, acquire_timeout: Duration) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = url.parse()?;
    // No runq transaction waits on its client for long; one that does belongs
    // to a paused or hung process and would hold row locks others need.
    // runq's rows are hot in the cache, so a primary-key probe costs little
    // more than a sequential page read: with the default of 4 the planner
    // hash-joins a batch of a few hundred completions against a scan of the
    // whole runs table instead of probing the key for each.
    //
    // No JIT: runq's statements touch a batch of rows by index, but a
    // generic plan's estimates (the claim's per-tenant share-out, say) can
    // pass `jit_above_cost`, and compiling then costs a hundred times the
    // statement, on every execution. Measured: the drain lost a quarter.
    let options = options.application_name("runq").options([
        ("idle_in_transaction_session_timeout", "30000"),
        ("random_page_cost", "1.1"),
        ("jit", "off"),
    ]);
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .connect_lazy_with(options))
}

/// Applies pending migrations.
///
/// # Errors
///
/// The database is unreachable or a migration fails.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Whether every embedded migration is applied: what `/ready` checks.
///
/// # Errors
///
/// The database is unreachable.
pub async fn migrations_applied(pool: &PgPool) -> Result<bool, DbError> {
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> =
        sqlx::query_scalar!("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await?;
    Ok(applied.unwrap_or(0) >= latest)
}
