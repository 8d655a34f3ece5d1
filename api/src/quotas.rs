//! `/v1/quotas`: a tenant's plan, its overrides, its effective limits and
//! current use, and an admin's changes to them.
//!
//! Changing quotas is an admin's act. Until tokens carry scopes, any token
//! of the tenant may do it (`TenantAuth`); an admin only ever changes their
//! own tenant. Operators change any tenant with `runq tenant quota`.

use poem_openapi::payload::Json;
use poem_openapi::{OpenApi, Tags};
use runq_shared::db::quotas;
use runq_shared::quotas::{QuotaReport, TenantQuotas};
use sqlx::PgPool;

use crate::auth::TenantAuth;
use crate::body::ApiJson;
use crate::error::ApiError;

#[derive(Tags)]
enum Tag {
    /// Quotas: the tenant's plan, limits and current use.
    Quotas,
}

/// The quota endpoints.
pub struct QuotasApi {
    pub(crate) pool: PgPool,
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Quotas")]
impl QuotasApi {
    /// Get the tenant's quotas
    ///
    /// The plan, the overrides, and for every quota its effective limit
    /// (`null`: none), current use where counted, and when it next drops.
    #[oai(path = "/quotas", method = "get", operation_id = "get_quotas")]
    async fn get(&self, auth: TenantAuth) -> Result<Json<QuotaReport>, ApiError> {
        let mut conn = self.pool.acquire().await?;
        Ok(Json(quotas::report(&mut conn, auth.0).await?))
    }

    /// Set the tenant's plan and overrides
    ///
    /// Replaces both: an override left out goes back to the plan's number.
    /// Answers with the quotas as they now stand.
    #[oai(path = "/quotas", method = "put", operation_id = "set_quotas")]
    async fn set(
        &self,
        // Admin only once tokens carry scopes: see the module doc.
        auth: TenantAuth,
        body: ApiJson<TenantQuotas>,
    ) -> Result<Json<QuotaReport>, ApiError> {
        let settings = body.0;
        settings
            .overrides
            .validate()
            .map_err(ApiError::Unprocessable)?;
        let mut tx = self.pool.begin().await?;
        quotas::set(&mut tx, auth.0, &settings).await?;
        let report = quotas::report(&mut tx, auth.0).await?;
        tx.commit().await?;
        Ok(Json(report))
    }
}
