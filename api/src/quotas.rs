//! `/v1/quotas`: a tenant's plan, its overrides, its effective limits and
//! current use, and an admin's changes to them.
//!
//! Reading them takes any scope; changing them takes `admin`, only ever for
//! the token's own tenant, and is audited (`quota.update`). Operators change
//! any tenant with `runq tenant quota`.

use poem_openapi::payload::Json;
use poem_openapi::{OpenApi, Tags};
use runq_shared::db::quotas;
use runq_shared::quotas::{QuotaPatch, QuotaReport, TenantQuotas};
use runq_shared::Scope;
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
        Ok(Json(quotas::report(&mut conn, auth.0.tenant_id).await?))
    }

    /// Change some of the tenant's quotas
    ///
    /// Scope `admin`. Changes only what the body names: `plan`, and per
    /// quota a number (set the override) or `null` (remove it: the plan's
    /// number applies again). Answers with the quotas as they now stand.
    /// Logged as `quota.update`.
    #[oai(path = "/quotas", method = "patch", operation_id = "update_quotas")]
    async fn update(
        &self,
        auth: TenantAuth,
        body: ApiJson<QuotaPatch>,
    ) -> Result<Json<QuotaReport>, ApiError> {
        auth.0.require(Scope::Admin)?;
        let mut tx = self.pool.begin().await?;
        let tenant = auth.0.tenant_id;
        quotas::patch(&mut tx, tenant, &body.0, &auth.0.actor()).await?;
        let report = quotas::report(&mut tx, tenant).await?;
        tx.commit().await?;
        Ok(Json(report))
    }

    /// Set the tenant's plan and overrides
    ///
    /// Replaces both: an override left out goes back to the plan's number.
    /// Answers with the quotas as they now stand.
    #[oai(path = "/quotas", method = "put", operation_id = "set_quotas")]
    async fn set(
        &self,
        auth: TenantAuth,
        body: ApiJson<TenantQuotas>,
    ) -> Result<Json<QuotaReport>, ApiError> {
        auth.0.require(Scope::Admin)?;
        let settings = body.0;
        settings
            .overrides
            .validate()
            .map_err(ApiError::Unprocessable)?;
        let mut tx = self.pool.begin().await?;
        let tenant = auth.0.tenant_id;
        quotas::change(&mut tx, tenant, &settings, &auth.0.actor()).await?;
        let report = quotas::report(&mut tx, tenant).await?;
        tx.commit().await?;
        Ok(Json(report))
    }
}
