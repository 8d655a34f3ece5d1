//! `GET /v1/audit`: the tenant's audit log, newest first (scope `admin`).

use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{OpenApi, Tags};
use runq_shared::db::audit;
use runq_shared::{AuditPage, Scope};
use sqlx::PgPool;

use crate::auth::TenantAuth;
use crate::error::ApiError;

#[derive(Tags)]
enum Tag {
    /// The audit log: who changed the tenant's settings (scope `admin`).
    Audit,
}

/// The audit log endpoint.
pub struct AuditApi {
    pub(crate) pool: PgPool,
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Audit")]
impl AuditApi {
    /// List the audit log
    ///
    /// Scope `admin`. Token issues and revocations, project deletions,
    /// production override changes, bulk retries and quota changes: actor,
    /// action, target, time and details, newest first. The log is
    /// append-only. Pass `next_cursor` of a page as `cursor` for the next one.
    #[oai(path = "/audit", method = "get", operation_id = "list_audit")]
    async fn list(
        &self,
        auth: TenantAuth,
        /// Only entries of this action (`token.create`, `project.delete`, ...).
        action: Query<Option<String>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<i64>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<AuditPage>, ApiError> {
        auth.0.require(Scope::Admin)?;
        let limit = i64::from(limit.0.unwrap_or(50));
        let mut conn = self.pool.acquire().await?;
        let entries = audit::list(
            &mut conn,
            auth.0.tenant_id,
            action.0.as_deref(),
            cursor.0,
            limit,
        )
        .await?;
        let next_cursor = if entries.len() as i64 == limit {
            entries.last().map(|entry| entry.id)
        } else {
            None
        };
        Ok(Json(AuditPage {
            entries,
            next_cursor,
        }))
    }
}
