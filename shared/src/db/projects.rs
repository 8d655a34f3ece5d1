//! Projects: targets under test, with the production override that lets runs
//! reach a `prod` one. Every query is scoped to one tenant: another tenant's
//! project answers [`DbError::ProjectNotFound`].

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::DbError;
use crate::model::TenantId;
use crate::tenancy::{CreateProject, Environment, ProductionOverride, Project, UpdateProject};

/// A project as stored.
struct Row {
    id: Uuid,
    name: String,
    environment: String,
    target_url: Option<String>,
    override_enabled_by: Option<Uuid>,
    override_enabled_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
}

impl From<Row> for Project {
    fn from(row: Row) -> Self {
        Project {
            id: row.id,
            name: row.name,
            // The check constraint admits only the three names.
            environment: Environment::parse(&row.environment).unwrap_or(Environment::Prod),
            target_url: row.target_url,
            production_override: row
                .override_enabled_at
                .map(|enabled_at| ProductionOverride {
                    enabled_by: row.override_enabled_by,
                    enabled_at,
                }),
            created_at: row.created_at,
        }
    }
}

/// A unique violation on the `(tenant_id, name)` key becomes
/// [`DbError::ProjectNameTaken`].
fn name_taken(err: sqlx::Error, name: &str) -> DbError {
    match &err {
        sqlx::Error::Database(db) if db.constraint() == Some("projects_tenant_id_name_key") => {
            DbError::ProjectNameTaken(name.to_owned())
        }
        _ => DbError::Sqlx(err),
    }
}

/// `query_as!` into a project [`Row`]: `prefix <every project column>
/// suffix`, the one place the column list is written (`prefix` ends in
/// `SELECT` or `RETURNING`).
macro_rules! query_projects {
    ($prefix:tt, $suffix:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            Row,
            $prefix
                + " id, name, environment, target_url, override_enabled_by, \
                   override_enabled_at, created_at "
                + $suffix
            $(, $arg)*
        )
    };
}

/// Creates a project of `tenant`, within its `projects` quota. Run it in a
/// transaction: the quota check holds the tenant's lock until it ends, so
/// two concurrent creations cannot both take the last place.
///
/// # Errors
///
/// [`DbError::QuotaExceeded`] past the `projects` quota,
/// [`DbError::ProjectNameTaken`], else database errors.
pub async fn create(
    conn: &mut PgConnection,
    tenant: TenantId,
    project: &CreateProject,
) -> Result<Project, DbError> {
    crate::db::quotas::check_projects(conn, tenant).await?;
    let row = query_projects!(
        "INSERT INTO projects (id, tenant_id, name, environment, target_url)
         VALUES ($1, $2, $3, $4, $5)
         RETURNING",
        "",
        Uuid::now_v7(),
        tenant,
        project.name,
        project.environment.as_str(),
        project.target_url,
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|err| name_taken(err, &project.name))?;
    Ok(row.into())
}

/// `tenant`'s projects, oldest first.
///
/// # Errors
///
/// Database errors.
pub async fn list(conn: &mut PgConnection, tenant: TenantId) -> Result<Vec<Project>, DbError> {
    let rows = query_projects!(
        "SELECT",
        "FROM projects WHERE tenant_id = $1 ORDER BY id",
        tenant,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(Project::from).collect())
}

/// Project `id` of `tenant`.
///
/// # Errors
///
/// [`DbError::ProjectNotFound`], else database errors.
pub async fn get(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> Result<Project, DbError> {
    query_projects!(
        "SELECT",
        "FROM projects WHERE tenant_id = $1 AND id = $2",
        tenant,
        id,
    )
    .fetch_optional(&mut *conn)
    .await?
    .map(Project::from)
    .ok_or(DbError::ProjectNotFound(id))
}

/// Whether `tenant` owns project `id`.
///
/// # Errors
///
/// Database errors.
pub async fn exists(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> Result<bool, DbError> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM projects WHERE tenant_id = $1 AND id = $2) AS "exists!""#,
        tenant,
        id,
    )
    .fetch_one(&mut *conn)
    .await?)
}

/// Changes the fields `changes` gives. A change of environment turns the
/// production override off: it was confirmed for the project as it was.
///
/// # Errors
///
/// [`DbError::ProjectNotFound`], [`DbError::ProjectNameTaken`], else
/// database errors.
pub async fn update(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    changes: &UpdateProject,
) -> Result<Project, DbError> {
    query_projects!(
        "UPDATE projects SET
            name = coalesce($3, name),
            target_url = coalesce($5, target_url),
            production_override = production_override AND coalesce($4 = environment, true),
            override_enabled_by = CASE WHEN coalesce($4 = environment, true)
                                       THEN override_enabled_by END,
            override_enabled_at = CASE WHEN coalesce($4 = environment, true)
                                       THEN override_enabled_at END,
            environment = coalesce($4, environment)
         WHERE tenant_id = $1 AND id = $2
         RETURNING",
        "",
        tenant,
        id,
        changes.name,
        changes.environment.map(Environment::as_str),
        changes.target_url,
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(|err| name_taken(err, changes.name.as_deref().unwrap_or_default()))?
    .map(Project::from)
    .ok_or(DbError::ProjectNotFound(id))
}

/// Deletes project `id` of `tenant` and returns it. Its runs keep their rows
/// (their `project_id` becomes null); ingest tokens bound to it go with it.
///
/// # Errors
///
/// [`DbError::ProjectNotFound`], else database errors.
pub async fn delete(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<Project, DbError> {
    query_projects!(
        "DELETE FROM projects WHERE tenant_id = $1 AND id = $2
         RETURNING",
        "",
        tenant,
        id,
    )
    .fetch_optional(&mut *conn)
    .await?
    .map(Project::from)
    .ok_or(DbError::ProjectNotFound(id))
}

/// Turns project `id`'s production override on (`Some(token)`: by that token)
/// or off (`None`). Turning on an override that is on keeps who enabled it.
///
/// # Errors
///
/// [`DbError::ProjectNotFound`], else database errors.
pub async fn set_override(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    enabled_by: Option<Uuid>,
) -> Result<Project, DbError> {
    query_projects!(
        "UPDATE projects SET
            production_override = $3::uuid IS NOT NULL,
            override_enabled_by = CASE WHEN $3::uuid IS NULL THEN NULL
                                       WHEN production_override THEN override_enabled_by
                                       ELSE $3 END,
            override_enabled_at = CASE WHEN $3::uuid IS NULL THEN NULL
                                       WHEN production_override THEN override_enabled_at
                                       ELSE now() END
         WHERE tenant_id = $1 AND id = $2
         RETURNING",
        "",
        tenant,
        id,
        enabled_by,
    )
    .fetch_optional(&mut *conn)
    .await?
    .map(Project::from)
    .ok_or(DbError::ProjectNotFound(id))
}

/// What the enqueue path needs to know of a project a run names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    /// The owner.
    pub tenant_id: TenantId,
    /// The project.
    pub id: Uuid,
    /// Its name, for the refusal's message.
    pub name: String,
    /// Whether runs may go through: not `prod`, or `prod` with the override on.
    pub open: bool,
}

/// The `(tenant, project)` pairs that exist, with whether each lets runs
/// through: one statement for a whole batch.
///
/// # Errors
///
/// Database errors.
pub async fn gates(
    conn: &mut PgConnection,
    tenants: &[TenantId],
    projects: &[Uuid],
) -> Result<Vec<Gate>, DbError> {
    Ok(sqlx::query_as!(
        Gate,
        r#"SELECT p.tenant_id, p.id, p.name,
                  (p.environment <> 'prod' OR p.production_override) AS "open!"
           FROM projects p
           JOIN unnest($1::uuid[], $2::uuid[]) AS w(tenant_id, id)
             ON w.tenant_id = p.tenant_id AND w.id = p.id"#,
        tenants,
        projects,
    )
    .fetch_all(&mut *conn)
    .await?)
}
