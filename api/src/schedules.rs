//! `/v1/schedules`: cron schedules that submit a run on each tick (scope
//! `runs`).

use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, Tags};
use runq_shared::db::schedules;
use runq_shared::{CreateRun, CreateSchedule, Schedule, ScheduleList, Scope, UpdateSchedule};
use sqlx::PgPool;
use uuid::Uuid;

use crate::auth::TenantAuth;
use crate::body::ApiJson;
use crate::error::ApiError;
use crate::runs::check_run;

#[derive(Tags)]
enum Tag {
    /// Schedules: runs submitted on a cron expression (scope `runs`).
    Schedules,
}

/// Answer of `POST /v1/schedules`.
#[derive(ApiResponse)]
pub enum CreateScheduleResponse {
    /// The schedule was created.
    #[oai(status = 201)]
    Created(Json<Schedule>),
}

/// Answer of `DELETE /v1/schedules/{id}`.
#[derive(ApiResponse)]
pub enum DeleteScheduleResponse {
    /// The schedule is deleted; the runs it made stay.
    #[oai(status = 204)]
    Deleted,
}

/// The schedule endpoints.
pub struct SchedulesApi {
    pub(crate) pool: PgPool,
    pub(crate) step_kinds: Vec<String>,
}

impl SchedulesApi {
    fn check_template(&self, run: &CreateRun) -> Result<(), ApiError> {
        if run.run_at.is_some() {
            return Err(ApiError::Unprocessable(
                "run.run_at cannot be set on a schedule's run: each tick is its time".to_owned(),
            ));
        }
        check_run(run, "run", &self.step_kinds)
    }
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Schedules")]
impl SchedulesApi {
    /// Create a schedule
    ///
    /// Scope `runs`. Each tick of `cron` (standard 5 fields, read in
    /// `timezone`) submits `run`, exactly once however many workers run: the
    /// tick's run carries the idempotency key `schedule:<id>:<tick>`. Ticks
    /// missed while no worker ran fire once, for the oldest, when one is back;
    /// the schedule then goes on from the next tick. A tick whose run is
    /// refused (a quota, the production gate) records why in `last_error`.
    #[oai(path = "/schedules", method = "post", operation_id = "create_schedule")]
    async fn create(
        &self,
        auth: TenantAuth,
        body: ApiJson<CreateSchedule>,
    ) -> Result<CreateScheduleResponse, ApiError> {
        auth.0.require(Scope::Runs)?;
        self.check_template(&body.0.run)?;
        let mut conn = self.pool.acquire().await?;
        let schedule = schedules::create(&mut conn, auth.0.tenant_id, &body.0).await?;
        Ok(CreateScheduleResponse::Created(Json(schedule)))
    }

    /// List schedules
    ///
    /// Scope `runs`. Oldest first, each with its next tick.
    #[oai(path = "/schedules", method = "get", operation_id = "list_schedules")]
    async fn list(&self, auth: TenantAuth) -> Result<Json<ScheduleList>, ApiError> {
        auth.0.require(Scope::Runs)?;
        let mut conn = self.pool.acquire().await?;
        let schedules = schedules::list(&mut conn, auth.0.tenant_id).await?;
        Ok(Json(ScheduleList { schedules }))
    }

    /// Get a schedule
    ///
    /// Scope `runs`.
    #[oai(path = "/schedules/:id", method = "get", operation_id = "get_schedule")]
    async fn get(&self, auth: TenantAuth, id: Path<Uuid>) -> Result<Json<Schedule>, ApiError> {
        auth.0.require(Scope::Runs)?;
        let mut conn = self.pool.acquire().await?;
        Ok(Json(
            schedules::get(&mut conn, auth.0.tenant_id, id.0).await?,
        ))
    }

    /// Change a schedule
    ///
    /// Scope `runs`. Changes the fields given. A new expression or zone, or
    /// turning it on, moves the next tick to the first one from now.
    #[oai(
        path = "/schedules/:id",
        method = "patch",
        operation_id = "update_schedule"
    )]
    async fn update(
        &self,
        auth: TenantAuth,
        id: Path<Uuid>,
        body: ApiJson<UpdateSchedule>,
    ) -> Result<Json<Schedule>, ApiError> {
        auth.0.require(Scope::Runs)?;
        if let Some(run) = &body.0.run {
            self.check_template(run)?;
        }
        let mut conn = self.pool.acquire().await?;
        Ok(Json(
            schedules::update(&mut conn, auth.0.tenant_id, id.0, &body.0).await?,
        ))
    }

    /// Delete a schedule
    ///
    /// Scope `runs`. The runs it made stay.
    #[oai(
        path = "/schedules/:id",
        method = "delete",
        operation_id = "delete_schedule"
    )]
    async fn delete(
        &self,
        auth: TenantAuth,
        id: Path<Uuid>,
    ) -> Result<DeleteScheduleResponse, ApiError> {
        auth.0.require(Scope::Runs)?;
        let mut conn = self.pool.acquire().await?;
        schedules::delete(&mut conn, auth.0.tenant_id, id.0).await?;
        Ok(DeleteScheduleResponse::Deleted)
    }
}
