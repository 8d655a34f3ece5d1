//! Bearer-token authentication: a token maps to exactly one tenant, and every
//! query an endpoint makes is scoped to that tenant.

use poem::Request;
use poem_openapi::auth::Bearer;
use poem_openapi::SecurityScheme;
use runq_shared::db::tenants;
use runq_shared::TenantId;
use sqlx::PgPool;

use crate::error::ApiError;

/// The authenticated tenant of a request.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "runq token", checker = "check_token")]
pub struct TenantAuth(pub TenantId);

async fn check_token(req: &Request, bearer: Bearer) -> poem::Result<TenantId> {
    let pool = req.data::<PgPool>().ok_or(ApiError::Internal)?;
    let mut conn = pool.acquire().await.map_err(ApiError::from)?;
    match tenants::tenant_for_token(&mut conn, &bearer.token)
        .await
        .map_err(ApiError::from)?
    {
        Some(tenant) => Ok(tenant),
        None => {
            Err(ApiError::Unauthorized("the bearer token is unknown or revoked".to_owned()).into())
        }
    }
}
