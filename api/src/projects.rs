//! `/v1/projects`: a tenant's projects and their production override (scope
//! `admin`). Deleting a project and turning its override on or off are
//! written to the audit log in the same transaction.

use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, Tags};
use runq_shared::db::{audit, projects};
use runq_shared::{
    CreateProject, EnableProductionOverride, Project, ProjectList, Scope, UpdateProject,
};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::auth::TenantAuth;
use crate::body::ApiJson;
use crate::error::ApiError;

#[derive(Tags)]
enum Tag {
    /// Projects: targets under test, and the production safety gate (scope `admin`).
    Projects,
}

/// Answer of `POST /v1/projects`.
#[derive(ApiResponse)]
pub enum CreateProjectResponse {
    /// The project was created.
    #[oai(status = 201)]
    Created(Json<Project>),
}

/// Answer of `DELETE /v1/projects/{id}`.
#[derive(ApiResponse)]
pub enum DeleteProjectResponse {
    /// The project is deleted; its runs keep their rows without a project.
    #[oai(status = 204)]
    Deleted,
}

/// The project endpoints.
pub struct ProjectsApi {
    pub(crate) pool: PgPool,
}

fn target(id: Uuid) -> String {
    format!("project:{id}")
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Projects")]
impl ProjectsApi {
    /// Create a project
    ///
    /// Scope `admin`. A `prod` project refuses runs until its production
    /// override is turned on.
    #[oai(path = "/projects", method = "post", operation_id = "create_project")]
    async fn create(
        &self,
        auth: TenantAuth,
        body: ApiJson<CreateProject>,
    ) -> Result<CreateProjectResponse, ApiError> {
        auth.0.require(Scope::Admin)?;
        let mut tx = self.pool.begin().await?;
        let project = projects::create(&mut tx, auth.0.tenant_id, &body.0).await?;
        audit::record(
            &mut tx,
            auth.0.tenant_id,
            &auth.0.actor(),
            audit::PROJECT_CREATE,
            &target(project.id),
            json!({ "name": project.name, "environment": project.environment }),
        )
        .await?;
        tx.commit().await?;
        Ok(CreateProjectResponse::Created(Json(project)))
    }

    /// List projects
    ///
    /// Scope `admin`. Oldest first.
    #[oai(path = "/projects", method = "get", operation_id = "list_projects")]
    async fn list(&self, auth: TenantAuth) -> Result<Json<ProjectList>, ApiError> {
        auth.0.require(Scope::Admin)?;
        let mut conn = self.pool.acquire().await?;
        let projects = projects::list(&mut conn, auth.0.tenant_id).await?;
        Ok(Json(ProjectList { projects }))
    }

    /// Get a project
    ///
    /// Scope `admin`. `production_override` says who enabled it and when.
    #[oai(path = "/projects/:id", method = "get", operation_id = "get_project")]
    async fn get(&self, auth: TenantAuth, id: Path<Uuid>) -> Result<Json<Project>, ApiError> {
        auth.0.require(Scope::Admin)?;
        let mut conn = self.pool.acquire().await?;
        Ok(Json(
            projects::get(&mut conn, auth.0.tenant_id, id.0).await?,
        ))
    }

    /// Change a project
    ///
    /// Scope `admin`. Changes the fields given. Changing the environment
    /// turns the production override off.
    #[oai(
        path = "/projects/:id",
        method = "patch",
        operation_id = "update_project"
    )]
    async fn update(
        &self,
        auth: TenantAuth,
        id: Path<Uuid>,
        body: ApiJson<UpdateProject>,
    ) -> Result<Json<Project>, ApiError> {
        auth.0.require(Scope::Admin)?;
        let mut conn = self.pool.acquire().await?;
        let project = projects::update(&mut conn, auth.0.tenant_id, id.0, &body.0).await?;
        Ok(Json(project))
    }

    /// Delete a project
    ///
    /// Scope `admin`. Its runs keep their rows (without a project); ingest
    /// tokens bound to it are deleted with it. Recorded in the audit log
    /// (`project.delete`).
    #[oai(
        path = "/projects/:id",
        method = "delete",
        operation_id = "delete_project"
    )]
    async fn delete(
        &self,
        auth: TenantAuth,
        id: Path<Uuid>,
    ) -> Result<DeleteProjectResponse, ApiError> {
        auth.0.require(Scope::Admin)?;
        let mut tx = self.pool.begin().await?;
        let project = projects::delete(&mut tx, auth.0.tenant_id, id.0).await?;
        audit::record(
            &mut tx,
            auth.0.tenant_id,
            &auth.0.actor(),
            audit::PROJECT_DELETE,
            &target(project.id),
            json!({ "name": project.name, "environment": project.environment }),
        )
        .await?;
        tx.commit().await?;
        Ok(DeleteProjectResponse::Deleted)
    }

    /// Turn the production override on
    ///
    /// Scope `admin`. Lets runs reach a `prod` project. Needs all three
    /// confirmations, each an explicit `true`: `not_customer_facing` ("This is
    /// NOT customer-facing production traffic"), `no_real_secrets` ("No real
    /// customer secrets or sensitive data exist here") and
    /// `accept_unsafe_agent_behavior` ("I accept that adversarial prompts MAY
    /// trigger unsafe agent behavior"); fewer is a 422 naming the missing
    /// ones. Recorded in the audit log with the confirmations
    /// (`project.production_override.enable`).
    #[oai(
        path = "/projects/:id/production-override",
        method = "post",
        operation_id = "enable_production_override"
    )]
    async fn enable_override(
        &self,
        auth: TenantAuth,
        id: Path<Uuid>,
        body: ApiJson<EnableProductionOverride>,
    ) -> Result<Json<Project>, ApiError> {
        auth.0.require(Scope::Admin)?;
        let confirmations = body.0;
        let mut tx = self.pool.begin().await?;
        // 404 before 422: another tenant's project is not there to confirm.
        projects::get(&mut tx, auth.0.tenant_id, id.0).await?;
        let missing = confirmations.missing();
        if !missing.is_empty() {
            return Err(ApiError::Unprocessable(format!(
                "the production override needs all three confirmations as explicit true; \
                 missing: {}",
                missing.join(", ")
            )));
        }
        let project =
            projects::set_override(&mut tx, auth.0.tenant_id, id.0, Some(auth.0.token_id)).await?;
        audit::record(
            &mut tx,
            auth.0.tenant_id,
            &auth.0.actor(),
            audit::OVERRIDE_ENABLE,
            &target(project.id),
            json!({ "confirmations": confirmations }),
        )
        .await?;
        tx.commit().await?;
        Ok(Json(project))
    }

    /// Turn the production override off
    ///
    /// Scope `admin`. Runs against the `prod` project are refused again.
    /// Recorded in the audit log (`project.production_override.disable`).
    #[oai(
        path = "/projects/:id/production-override",
        method = "delete",
        operation_id = "disable_production_override"
    )]
    async fn disable_override(
        &self,
        auth: TenantAuth,
        id: Path<Uuid>,
    ) -> Result<Json<Project>, ApiError> {
        auth.0.require(Scope::Admin)?;
        let mut tx = self.pool.begin().await?;
        let before = projects::get(&mut tx, auth.0.tenant_id, id.0).await?;
        let project = projects::set_override(&mut tx, auth.0.tenant_id, id.0, None).await?;
        audit::record(
            &mut tx,
            auth.0.tenant_id,
            &auth.0.actor(),
            audit::OVERRIDE_DISABLE,
            &target(project.id),
            json!({ "was": before.production_override }),
        )
        .await?;
        tx.commit().await?;
        Ok(Json(project))
    }
}
