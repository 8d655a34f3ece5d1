//! `/v1/tokens`: issue, list and revoke a tenant's API tokens (scope
//! `admin`). Each issue and revocation is written to the audit log in the
//! same transaction.

use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, Tags};
use runq_shared::db::{audit, tokens};
use runq_shared::{CreateToken, CreatedToken, Scope, TokenList};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::auth::TenantAuth;
use crate::body::ApiJson;
use crate::error::ApiError;

#[derive(Tags)]
enum Tag {
    /// API tokens and their scopes (scope `admin`).
    Tokens,
}

/// Answer of `POST /v1/tokens`.
#[derive(ApiResponse)]
pub enum CreateTokenResponse {
    /// The token was issued; `token` is its plaintext, shown this once.
    #[oai(status = 201)]
    Created(Json<CreatedToken>),
}

/// Answer of `DELETE /v1/tokens/{id}`.
#[derive(ApiResponse)]
pub enum RevokeTokenResponse {
    /// The token is revoked (or already was): refused from the next request on.
    #[oai(status = 204)]
    Revoked,
}

/// The token endpoints.
pub struct TokensApi {
    pub(crate) pool: PgPool,
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Tokens")]
impl TokensApi {
    /// Issue a token
    ///
    /// Scope `admin`. The answer holds the plaintext token once; runq stores
    /// only its SHA-256 digest. An `ingest` token must name the project it is
    /// bound to. Recorded in the audit log (`token.create`).
    #[oai(path = "/tokens", method = "post", operation_id = "create_token")]
    async fn create(
        &self,
        auth: TenantAuth,
        body: ApiJson<CreateToken>,
    ) -> Result<CreateTokenResponse, ApiError> {
        auth.0.require(Scope::Admin)?;
        let request = body.0;
        let mut tx = self.pool.begin().await?;
        let issued = tokens::create(
            &mut tx,
            auth.0.tenant_id,
            &request.name,
            &request.scopes,
            request.project_id,
        )
        .await?;
        let token = issued.token;
        audit::record(
            &mut tx,
            auth.0.tenant_id,
            &auth.0.actor(),
            audit::TOKEN_CREATE,
            &format!("token:{}", token.id),
            json!({ "name": token.name, "scopes": token.scopes, "project_id": token.project_id }),
        )
        .await?;
        tx.commit().await?;
        Ok(CreateTokenResponse::Created(Json(CreatedToken {
            token: issued.plaintext,
            id: token.id,
            name: token.name,
            scopes: token.scopes,
            project_id: token.project_id,
            created_at: token.created_at,
        })))
    }

    /// List tokens
    ///
    /// Scope `admin`. Every token of the tenant, revoked ones included,
    /// oldest first; never a token's plaintext or digest.
    #[oai(path = "/tokens", method = "get", operation_id = "list_tokens")]
    async fn list(&self, auth: TenantAuth) -> Result<Json<TokenList>, ApiError> {
        auth.0.require(Scope::Admin)?;
        let mut conn = self.pool.acquire().await?;
        let tokens = tokens::list(&mut conn, auth.0.tenant_id).await?;
        Ok(Json(TokenList { tokens }))
    }

    /// Revoke a token
    ///
    /// Scope `admin`. The token is refused from the next request on (a token
    /// may revoke itself). Recorded in the audit log (`token.revoke`).
    #[oai(path = "/tokens/:id", method = "delete", operation_id = "revoke_token")]
    async fn revoke(
        &self,
        auth: TenantAuth,
        id: Path<Uuid>,
    ) -> Result<RevokeTokenResponse, ApiError> {
        auth.0.require(Scope::Admin)?;
        let mut tx = self.pool.begin().await?;
        let (_, revoked) = tokens::revoke(&mut tx, Some(auth.0.tenant_id), id.0).await?;
        if revoked {
            audit::record(
                &mut tx,
                auth.0.tenant_id,
                &auth.0.actor(),
                audit::TOKEN_REVOKE,
                &format!("token:{}", id.0),
                json!({}),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(RevokeTokenResponse::Revoked)
    }
}
