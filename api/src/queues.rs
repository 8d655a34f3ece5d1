//! `/v1/queues` and `/v1/workers`: what is queued, running and finishing,
//! and which workers are live.

use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{OpenApi, Tags};
use runq_shared::db::{runs, workers};
use runq_shared::{QueueList, QueueStats, Scope, WorkerList, MAX_QUEUE_LEN};
use sqlx::PgPool;

use crate::auth::TenantAuth;
use crate::error::ApiError;

#[derive(Tags)]
enum Tag {
    /// Queues and workers: counts, waits and throughput, live workers.
    Queues,
}

/// A worker silent this long is not listed (its runs are rescued after
/// their leases end).
const LIVE_WITHIN_MS: i64 = 60_000;

/// The queue and worker endpoints.
pub struct QueuesApi {
    pub(crate) pool: PgPool,
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Queues")]
impl QueuesApi {
    /// List queues
    ///
    /// Scope `runs`. Every queue the tenant has runs in, with its own runs
    /// counted by status (finished ones until pruned), how long the oldest
    /// due pending run has waited, and the runs started and finished in the
    /// last minute.
    #[oai(path = "/queues", method = "get", operation_id = "list_queues")]
    async fn list(&self, auth: TenantAuth) -> Result<Json<QueueList>, ApiError> {
        auth.0.require(Scope::Runs)?;
        let mut conn = self.pool.acquire().await?;
        let queues = runs::read::queue_stats(&mut conn, auth.0.tenant_id, None).await?;
        Ok(Json(QueueList { queues }))
    }

    /// Get a queue
    ///
    /// Scope `runs`. As in the list; 404 when the tenant has no run in it.
    #[oai(path = "/queues/:name", method = "get", operation_id = "get_queue")]
    async fn get(
        &self,
        auth: TenantAuth,
        /// The queue's name (1 to 64 characters).
        #[oai(validator(min_length = 1, max_length = 64))]
        name: Path<String>,
    ) -> Result<Json<QueueStats>, ApiError> {
        auth.0.require(Scope::Runs)?;
        let not_found = || ApiError::NotFound(format!("no run of yours is in queue '{}'", name.0));
        // No stored queue name holds NUL or passes the length cap.
        if name.0.contains('\0') || name.0.chars().count() > MAX_QUEUE_LEN {
            return Err(not_found());
        }
        let mut conn = self.pool.acquire().await?;
        runs::read::queue_stats(&mut conn, auth.0.tenant_id, Some(&name.0))
            .await?
            .pop()
            .map(Json)
            .ok_or_else(not_found)
    }

    /// List live workers
    ///
    /// Scope `admin`. Worker processes that have not stopped and
    /// heartbeated in the last minute: host, pid, queues, concurrency, the
    /// runs each holds now (of every tenant: workers are shared) and the
    /// last heartbeat.
    #[oai(path = "/workers", method = "get", operation_id = "list_workers")]
    async fn workers(&self, auth: TenantAuth) -> Result<Json<WorkerList>, ApiError> {
        auth.0.require(Scope::Admin)?;
        let mut conn = self.pool.acquire().await?;
        let workers = workers::live(&mut conn, LIVE_WITHIN_MS).await?;
        Ok(Json(WorkerList { workers }))
    }
}
