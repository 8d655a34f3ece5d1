//! Every statement that touches `runs`, with the step, event and outbox rows
//! written alongside, split by concern:
//!
//! - [`enqueue`]: inserting runs (API, library, batch), idempotency keys.
//! - [`claim`]: handing pending runs to a worker under a new lease.
//! - [`complete`]: a worker's checkpoints and outcomes.
//! - [`lease`]: heartbeats, graceful hand-back and the rescuer.
//! - [`read`]: what clients read.
//! - [`stream`]: what a run's live event stream reads.
//! - [`admin`]: what clients change (cancel, retry, bulk retry).
//! - [`prune`]: deleting finished runs past retention.
//!
//! Each state change of a run writes its outbox row in the same statement, so
//! the two commit together (DESIGN.md, invariant 3): the changed row's
//! event fields as typed columns (`queue`, `status`, `attempt`,
//! `max_attempts`, `run_at`, `error`, `result`), from which
//! `runq_outbox_event(outbox)` builds the event when it is read.
//!
//! Writes a worker makes are fenced on the run's lease token: `r.lease_token =
//! <the claim's token>`. Tokens only grow over a run's whole life: each claim
//! takes a new one and every move out of `running` (completion, rescue,
//! hand-back) takes another, so the token matches only while the lease it was
//! issued with is the run's current one (invariant 1; docs/adr/0001). The
//! fence needs no status or worker predicate, and the run is found by its
//! primary key.

use sqlx::types::Json;

use crate::model::{AttemptError, Run, RunStatus};

/// Selects runs as [`RunRow`]s: `query_runs!(prefix, suffix, args...)` runs
/// `prefix SELECT <every Run column> suffix`, where `suffix` starts with the
/// `FROM` of a relation with the columns of `runs` (the table or a CTE
/// returning `r.*`). The one place the column list is written.
macro_rules! query_runs {
    ($prefix:tt, $suffix:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            $crate::db::runs::RunRow,
            $prefix
                + r#" SELECT id AS "id!", tenant_id AS "tenant_id!", project_id,
                      queue AS "queue!", priority AS "priority!",
                      status AS "status!: crate::model::RunStatus", run_at AS "run_at!",
                      attempt AS "attempt!", max_attempts AS "max_attempts!",
                      timeout_seconds, metadata AS "metadata!", idempotency_key,
                      sequence_key, sequence_waiting AS "sequence_waiting!",
                      cancel_requested AS "cancel_requested!", result, error,
                      errors AS "errors: sqlx::types::Json<Vec<crate::model::AttemptError>>",
                      created_at AS "created_at!", started_at, finished_at "#
                + $suffix
            $(, $arg)*
        )
    };
}

pub mod admin;
pub mod claim;
pub mod complete;
pub mod enqueue;
pub mod lease;
pub mod prune;
pub mod read;
pub mod stream;

pub use admin::{cancel, retry, retry_many};
pub use claim::{claim, claim_limited_aware, Claimed};
pub use complete::{checkpoint_many, complete_many};
pub use enqueue::{enqueue, enqueue_many, Enqueued};
pub use lease::{extend_leases, release_many, rescue_expired, RescueReport};
pub use prune::{prune_finished, PruneBatch, Retention};
pub use read::{get, list, RunFilter};

/// A `runs` row as [`query_runs!`] reads it; becomes a [`Run`].
#[doc(hidden)]
#[derive(Debug)]
pub struct RunRow {
    id: uuid::Uuid,
    tenant_id: uuid::Uuid,
    project_id: Option<uuid::Uuid>,
    queue: String,
    priority: i16,
    status: RunStatus,
    run_at: chrono::DateTime<chrono::Utc>,
    attempt: i32,
    max_attempts: i32,
    timeout_seconds: Option<i32>,
    metadata: serde_json::Value,
    idempotency_key: Option<String>,
    sequence_key: Option<String>,
    sequence_waiting: bool,
    cancel_requested: bool,
    result: Option<serde_json::Value>,
    error: Option<serde_json::Value>,
    errors: Option<Json<Vec<AttemptError>>>,
    created_at: chrono::DateTime<chrono::Utc>,
    started_at: Option<chrono::DateTime<chrono::Utc>>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<RunRow> for Run {
    fn from(row: RunRow) -> Self {
        Run {
            id: row.id,
            tenant_id: row.tenant_id,
            project_id: row.project_id,
            queue: row.queue,
            priority: row.priority,
            status: row.status,
            run_at: row.run_at,
            attempt: row.attempt,
            max_attempts: row.max_attempts,
            timeout_seconds: row.timeout_seconds,
            metadata: row.metadata,
            idempotency_key: row.idempotency_key,
            sequence_key: row.sequence_key,
            sequence_waiting: row.sequence_waiting,
            cancel_requested: row.cancel_requested,
            result: row.result,
            error: row.error,
            errors: row.errors.map(|errors| errors.0).unwrap_or_default(),
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
        }
    }
}
