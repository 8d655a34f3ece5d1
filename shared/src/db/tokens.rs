//! API tokens: issuing (the plaintext is returned once, only its SHA-256
//! digest is stored), looking a presented token up, listing and revoking.

use chrono::{DateTime, Utc};
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use super::DbError;
use crate::model::TenantId;
use crate::tenancy::{Scope, Token};

/// Prefix of every token runq issues, so leaked tokens are easy to scan for.
pub const TOKEN_PREFIX: &str = "runq_";

/// The digest a token is stored and looked up by (32 bytes).
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// What a valid token grants: who it acts for and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The tenant the token belongs to.
    pub tenant_id: TenantId,
    /// The token itself.
    pub token_id: Uuid,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// The project an `ingest` token is bound to.
    pub project_id: Option<Uuid>,
}

/// A newly issued token: its record and, this once, its plaintext.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The stored record.
    pub token: Token,
    /// The bearer token; not stored anywhere.
    pub plaintext: String,
}

fn scopes_of(stored: Vec<String>) -> Vec<Scope> {
    // The check constraint admits only known names.
    stored
        .iter()
        .filter_map(|name| Scope::parse(name))
        .collect()
}

/// Issues a token for `tenant` with `scopes`, bound to `project` (required
/// with [`Scope::Ingest`]; it must be one of `tenant`'s projects).
///
/// # Errors
///
/// [`DbError::Invalid`] for no scopes or a project binding that does not fit
/// the scopes, [`DbError::ProjectNotFound`] for a project `tenant` does not
/// own, else database errors.
pub async fn create(
    conn: &mut PgConnection,
    tenant: TenantId,
    name: &str,
    scopes: &[Scope],
    project: Option<Uuid>,
) -> Result<Issued, DbError> {
    let mut scopes = scopes.to_vec();
    scopes.sort_unstable();
    scopes.dedup();
    let invalid = |message: &str| DbError::Invalid(crate::model::InvalidRun(message.to_owned()));
    if scopes.is_empty() {
        return Err(invalid(
            "scopes must name at least one of admin, runs, ingest",
        ));
    }
    match (scopes.contains(&Scope::Ingest), project) {
        (true, None) => return Err(invalid("project_id is required for an ingest token")),
        (false, Some(_)) => {
            return Err(invalid(
                "project_id binds ingest tokens only; add the ingest scope or drop project_id",
            ))
        }
        _ => {}
    }
    if let Some(project) = project {
        if !super::projects::exists(conn, tenant, project).await? {
            return Err(DbError::ProjectNotFound(project));
        }
    }
    let plaintext = format!(
        "{TOKEN_PREFIX}{}",
        Alphanumeric.sample_string(&mut rand::rng(), 40)
    );
    let names: Vec<String> = scopes.iter().map(|s| s.as_str().to_owned()).collect();
    let id = Uuid::now_v7();
    let created_at: DateTime<Utc> = sqlx::query_scalar!(
        "INSERT INTO api_tokens (id, tenant_id, name, token_hash, scopes, project_id)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING created_at",
        id,
        tenant,
        name,
        token_hash(&plaintext),
        &names,
        project,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(Issued {
        token: Token {
            id,
            name: name.to_owned(),
            scopes,
            project_id: project,
            created_at,
            revoked_at: None,
            last_used_at: None,
        },
        plaintext,
    })
}

/// What `token` grants, or `None` when it is unknown or revoked. One index
/// probe by digest whether or not the token exists, so the time taken does
/// not tell a caller which tokens exist; revocation is read on every call.
/// Records the use in `last_used_at` at most once a minute.
///
/// # Errors
///
/// Database errors.
pub async fn authenticate(conn: &mut PgConnection, token: &str) -> Result<Option<Grant>, DbError> {
    let row = sqlx::query!(
        r#"
        WITH found AS (
            SELECT id, tenant_id, scopes, project_id, last_used_at FROM api_tokens
            WHERE token_hash = $1 AND revoked_at IS NULL
        ), touched AS (
            -- A write per request would cost a commit each; to the minute is
            -- enough to tell a live token from a forgotten one.
            UPDATE api_tokens SET last_used_at = now()
            WHERE id = (SELECT id FROM found)
              AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
        )
        SELECT id, tenant_id, scopes, project_id FROM found
        "#,
        token_hash(token),
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|row| Grant {
        tenant_id: row.tenant_id,
        token_id: row.id,
        scopes: scopes_of(row.scopes),
        project_id: row.project_id,
    }))
}

/// `tenant`'s tokens, revoked ones included, oldest first.
///
/// # Errors
///
/// Database errors.
pub async fn list(conn: &mut PgConnection, tenant: TenantId) -> Result<Vec<Token>, DbError> {
    let rows = sqlx::query!(
        "SELECT id, name, scopes, project_id, created_at, revoked_at, last_used_at
         FROM api_tokens WHERE tenant_id = $1 ORDER BY id",
        tenant,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| Token {
            id: row.id,
            name: row.name,
            scopes: scopes_of(row.scopes),
            project_id: row.project_id,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
            last_used_at: row.last_used_at,
        })
        .collect())
}

/// Revokes token `id` of `tenant` (`None`: of whichever tenant owns it, for
/// an operator) from the next request on, and returns the owning tenant and
/// whether this call revoked it (`false`: it was already revoked).
///
/// # Errors
///
/// [`DbError::TokenNotFound`] when no such token belongs to `tenant`, else
/// database errors.
pub async fn revoke(
    conn: &mut PgConnection,
    tenant: Option<TenantId>,
    id: Uuid,
) -> Result<(TenantId, bool), DbError> {
    let row = sqlx::query!(
        r#"
        WITH target AS (
            SELECT id, tenant_id, revoked_at FROM api_tokens
            WHERE id = $1 AND ($2::uuid IS NULL OR tenant_id = $2)
            FOR UPDATE
        ), revoked AS (
            UPDATE api_tokens SET revoked_at = now()
            WHERE id = (SELECT id FROM target WHERE revoked_at IS NULL)
            RETURNING id
        )
        SELECT tenant_id, EXISTS (SELECT 1 FROM revoked) AS "revoked!" FROM target
        "#,
        id,
        tenant,
    )
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) => Ok((row.tenant_id, row.revoked)),
        None => Err(DbError::TokenNotFound(id)),
    }
}
