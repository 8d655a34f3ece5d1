//! `/v1/runs`: submit, list, inspect, cancel and retry runs.

use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, Tags};
use runq_shared::db::audit;
use runq_shared::db::runs::{self, RunFilter};
use runq_shared::db::{events, steps};
use runq_shared::{
    CreateRun, CreateRuns, CreatedRuns, EventPage, NewRun, RetriedRuns, RetryRuns, Run, RunDetail,
    RunPage, RunStatus, Scope, MAX_BATCH, MAX_STEPS,
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::auth::TenantAuth;
use crate::body::ApiJson;
use crate::error::ApiError;

#[derive(Tags)]
enum Tag {
    /// Runs: units of work executed by workers.
    Runs,
}

/// Answer of `POST /v1/runs`.
#[derive(ApiResponse)]
pub enum CreateRunResponse {
    /// The run was created.
    #[oai(status = 201)]
    Created(Json<Run>),
    /// A run with this `Idempotency-Key` already exists; it is returned unchanged.
    #[oai(status = 200)]
    Existing(Json<Run>),
}

/// Answer of `POST /v1/runs/batch`.
#[derive(ApiResponse)]
pub enum CreateRunsResponse {
    /// The runs were created, in request order.
    #[oai(status = 201)]
    Created(Json<CreatedRuns>),
}

/// The header that makes `POST /v1/runs` idempotent.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The runs endpoints.
pub struct RunsApi {
    pub(crate) pool: PgPool,
    /// Custom step kinds accepted beside the built-in ones.
    pub(crate) step_kinds: Vec<String>,
}

/// Checks `run` (at `path` in the body, `""` for the body itself) beyond
/// its schema: sizes in bytes, ranges, step kinds. Messages name the field by
/// its path in the body (`runs[3].steps`).
pub(crate) fn check_run(
    run: &CreateRun,
    path: &str,
    step_kinds: &[String],
) -> Result<(), ApiError> {
    let at = |field: &str| match path {
        "" => field.to_owned(),
        path => format!("{path}.{field}"),
    };
    // Checked here too so the message carries the path; `validate` words it
    // without one.
    if run.steps.is_empty() || run.steps.len() > MAX_STEPS {
        return Err(ApiError::Unprocessable(format!(
            "{} must hold 1 to {MAX_STEPS} steps, got {}",
            at("steps"),
            run.steps.len()
        )));
    }
    run.validate(Some(step_kinds)).map_err(|e| match path {
        "" => ApiError::Unprocessable(e.0),
        path => ApiError::Unprocessable(format!("{path}: {}", e.0)),
    })
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Runs")]
impl RunsApi {
    /// Submit a run
    ///
    /// Inserts the run, its steps and its `run.created` outbox row in one
    /// transaction and wakes the workers. With an `Idempotency-Key`, a repeated
    /// request of the same tenant returns the first run (200) instead of a new one.
    #[oai(path = "/runs", method = "post", operation_id = "create_run")]
    async fn create(
        &self,
        auth: TenantAuth,
        request: &poem::Request,
        body: ApiJson<CreateRun>,
        /// Repeating a request with the same key returns the first run:
        /// printable ASCII (so characters are bytes), 1 to 255 of them.
        #[oai(
            name = "Idempotency-Key",
            validator(min_length = 1, max_length = 255, pattern = r"^[\x20-\x7E]*$")
        )]
        idempotency_key: Header<Option<String>>,
    ) -> Result<CreateRunResponse, ApiError> {
        auth.0.require(Scope::Runs)?;
        let run = body.0;
        // poem-openapi reads a header it cannot decode as ASCII as absent:
        // such a key would be ignored and a retry would create a second run.
        if idempotency_key.0.is_none() && request.headers().contains_key(IDEMPOTENCY_KEY) {
            return Err(ApiError::BadRequest(
                "header Idempotency-Key must be printable ASCII".to_owned(),
            ));
        }
        check_run(&run, "", &self.step_kinds)?;
        let new = NewRun {
            tenant_id: auth.0.tenant_id,
            idempotency_key: idempotency_key.0,
            run,
        };
        let mut conn = self.pool.acquire().await?;
        let enqueued = runs::enqueue(&mut conn, new).await?;
        Ok(if enqueued.created {
            CreateRunResponse::Created(Json(enqueued.run))
        } else {
            CreateRunResponse::Existing(Json(enqueued.run))
        })
    }

    /// Submit up to 1,000 runs at once
    ///
    /// All runs are inserted in one transaction with one statement per table:
    /// either every run is created or none is.
    #[oai(path = "/runs/batch", method = "post", operation_id = "create_runs")]
    async fn create_batch(
        &self,
        auth: TenantAuth,
        body: ApiJson<CreateRuns>,
    ) -> Result<CreateRunsResponse, ApiError> {
        auth.0.require(Scope::Runs)?;
        let requested = body.0.runs;
        if requested.is_empty() || requested.len() > MAX_BATCH {
            return Err(ApiError::Unprocessable(format!(
                "runs must hold 1 to {MAX_BATCH} runs, got {}",
                requested.len()
            )));
        }
        for (index, run) in requested.iter().enumerate() {
            check_run(run, &format!("runs[{index}]"), &self.step_kinds)?;
        }
        let new: Vec<NewRun> = requested
            .into_iter()
            .map(|run| NewRun {
                tenant_id: auth.0.tenant_id,
                idempotency_key: None,
                run,
            })
            .collect();
        let mut tx = self.pool.begin().await?;
        let enqueued = runs::enqueue_many(&mut tx, new).await?;
        tx.commit().await?;
        Ok(CreateRunsResponse::Created(Json(CreatedRuns {
            runs: enqueued.into_iter().map(|e| e.run).collect(),
        })))
    }

    /// List runs
    ///
    /// Newest first. `GET /v1/runs?status=failed` is the dead-letter list. Pass
    /// `next_cursor` of a page as `cursor` to get the next one.
    #[oai(path = "/runs", method = "get", operation_id = "list_runs")]
    async fn list(
        &self,
        auth: TenantAuth,
        /// Only runs in this status.
        status: Query<Option<RunStatus>>,
        /// Only runs of this queue.
        queue: Query<Option<String>>,
        /// Only runs of this project.
        project_id: Query<Option<Uuid>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<Uuid>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<RunPage>, ApiError> {
        auth.0.require(Scope::Runs)?;
        let limit = i64::from(limit.0.unwrap_or(50));
        let filter = RunFilter {
            status: status.0,
            queue: queue.0,
            project_id: project_id.0,
            before: cursor.0,
        };
        let mut conn = self.pool.acquire().await?;
        let runs = runs::list(&mut conn, auth.0.tenant_id, &filter, limit).await?;
        let next_cursor = if runs.len() as i64 == limit {
            runs.last().map(|run| run.id)
        } else {
            None
        };
        Ok(Json(RunPage { runs, next_cursor }))
    }

    /// Get a run with its steps
    #[oai(path = "/runs/:id", method = "get", operation_id = "get_run")]
    async fn get(&self, auth: TenantAuth, id: Path<Uuid>) -> Result<Json<RunDetail>, ApiError> {
        auth.0.require(Scope::Runs)?;
        let mut conn = self.pool.acquire().await?;
        let run = runs::get(&mut conn, auth.0.tenant_id, id.0).await?;
        let steps = steps::list(&mut conn, auth.0.tenant_id, id.0).await?;
        Ok(Json(RunDetail { run, steps }))
    }

    /// List a run's events
    ///
    /// Oldest first. Pass `next_cursor` of a page as `after` for the next one.
    #[oai(
        path = "/runs/:id/events",
        method = "get",
        operation_id = "list_run_events"
    )]
    async fn events(
        &self,
        auth: TenantAuth,
        id: Path<Uuid>,
        /// Only events after this event id (`next_cursor` of the previous page).
        after: Query<Option<i64>>,
        /// Page size, 1 to 500 (default 100).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<EventPage>, ApiError> {
        auth.0.require(Scope::Runs)?;
        let limit = i64::from(limit.0.unwrap_or(100));
        let mut conn = self.pool.acquire().await?;
        // 404 for a run of another tenant, not an empty page.
        runs::get(&mut conn, auth.0.tenant_id, id.0).await?;
        let events = events::list(
            &mut conn,
            auth.0.tenant_id,
            id.0,
            after.0.unwrap_or(0),
            limit,
        )
        .await?;
        let next_cursor = if events.len() as i64 == limit {
            events.last().map(|event| event.id)
        } else {
            None
        };
        Ok(Json(EventPage {
            events,
            next_cursor,
        }))
    }

    /// Cancel a run
    ///
    /// A pending run is cancelled at once. A running run is flagged and its
    /// worker stops it. A failed or stopped run is cancelled at once: it
    /// gives up for good and lets go of its `sequence_key`, so the runs
    /// waiting behind it go on. Cancelling a cancelled run changes nothing;
    /// a succeeded run answers 409.
    #[oai(
        path = "/runs/:id/cancel",
        method = "post",
        operation_id = "cancel_run"
    )]
    async fn cancel(&self, auth: TenantAuth, id: Path<Uuid>) -> Result<Json<Run>, ApiError> {
        auth.0.require(Scope::Runs)?;
        let mut tx = self.pool.begin().await?;
        let run = runs::cancel(&mut tx, auth.0.tenant_id, id.0).await?;
        tx.commit().await?;
        Ok(Json(run))
    }

    /// Retry many finished runs
    ///
    /// Revives up to `limit` runs in `status` (default `failed`: the dead
    /// letters), optionally of one queue or project, oldest first.
    #[oai(path = "/runs/retry", method = "post", operation_id = "retry_runs")]
    async fn retry_many(
        &self,
        auth: TenantAuth,
        body: ApiJson<RetryRuns>,
    ) -> Result<Json<RetriedRuns>, ApiError> {
        auth.0.require(Scope::Runs)?;
        let filter = body.0;
        if !(1..=MAX_BATCH as i64).contains(&filter.limit) {
            return Err(ApiError::Unprocessable(format!(
                "limit must be 1 to {MAX_BATCH}, got {}",
                filter.limit
            )));
        }
        let mut tx = self.pool.begin().await?;
        let ids = runs::retry_many(
            &mut tx,
            auth.0.tenant_id,
            filter.status.into(),
            filter.queue.as_deref(),
            filter.project_id,
            filter.limit,
        )
        .await?;
        if !ids.is_empty() {
            audit::record(
                &mut tx,
                auth.0.tenant_id,
                &auth.0.actor(),
                audit::RUNS_BULK_RETRY,
                "runs",
                serde_json::json!({
                    "status": RunStatus::from(filter.status).as_str(),
                    "queue": filter.queue,
                    "project_id": filter.project_id,
                    "limit": filter.limit,
                    "retried": ids.len(),
                }),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Json(RetriedRuns { ids }))
    }

    /// Retry a failed, stopped or cancelled run
    ///
    /// The run goes back to pending with fresh attempts and resumes at its
    /// first unfinished step.
    #[oai(path = "/runs/:id/retry", method = "post", operation_id = "retry_run")]
    async fn retry(&self, auth: TenantAuth, id: Path<Uuid>) -> Result<Json<Run>, ApiError> {
        auth.0.require(Scope::Runs)?;
        let mut tx = self.pool.begin().await?;
        let run = runs::retry(&mut tx, auth.0.tenant_id, id.0).await?;
        tx.commit().await?;
        Ok(Json(run))
    }
}
