//! Bearer-token authentication and scopes. A token maps to exactly one
//! tenant, and every query an endpoint makes is scoped to that tenant; each
//! endpoint names the scope it needs with [`Caller::require`].
//!
//! The presented token is hashed and looked up by its digest in one indexed
//! query, whatever it looks like: an unknown token, a revoked one and a
//! malformed one cost the same and answer the same 401, so neither the
//! answer nor its timing tells which tokens exist. Revocation is read on
//! every request (nothing is cached), so it takes effect on the next one.

use poem::Request;
use poem_openapi::auth::Bearer;
use poem_openapi::SecurityScheme;
use runq_shared::db::audit::Actor;
use runq_shared::db::tokens;
use runq_shared::{Scope, TenantId};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::ApiError;

/// Who is calling: the tenant and token a valid bearer token grants.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The tenant every query is scoped to.
    pub tenant_id: TenantId,
    /// The token that authenticated the request (the audit log's actor).
    pub token_id: Uuid,
    /// What the token may do.
    pub scopes: Vec<Scope>,
    /// The project an `ingest` token is bound to.
    pub project_id: Option<Uuid>,
}

impl Caller {
    /// Refuses the request with 403 unless the token has `scope`.
    ///
    /// # Errors
    ///
    /// [`ApiError::Forbidden`] naming the scope needed.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.contains(&scope) {
            return Ok(());
        }
        let held: Vec<&str> = self.scopes.iter().map(|s| s.as_str()).collect();
        Err(ApiError::Forbidden(format!(
            "this endpoint needs a token with scope '{}'; this token has {}",
            scope.as_str(),
            held.join(", ")
        )))
    }

    /// The caller as the audit log records it.
    pub fn actor(&self) -> Actor {
        Actor::Token(self.token_id)
    }
}

/// The authenticated caller of a request.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "runq token", checker = "check_token")]
pub struct TenantAuth(pub Caller);

async fn check_token(req: &Request, bearer: Bearer) -> poem::Result<Caller> {
    let pool = req.data::<PgPool>().ok_or(ApiError::Internal)?;
    let mut conn = pool.acquire().await.map_err(ApiError::from)?;
    match tokens::authenticate(&mut conn, &bearer.token)
        .await
        .map_err(ApiError::from)?
    {
        Some(grant) => Ok(Caller {
            tenant_id: grant.tenant_id,
            token_id: grant.token_id,
            scopes: grant.scopes,
            project_id: grant.project_id,
        }),
        None => Err(ApiError::Unauthorized(UNKNOWN_TOKEN.to_owned()).into()),
    }
}

/// The one answer to a token that grants nothing, whether it never existed,
/// was revoked or is malformed.
pub const UNKNOWN_TOKEN: &str = "the bearer token is unknown or revoked";
