//! Tenants, their API tokens and their projects.

use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use super::DbError;
use crate::model::TenantId;

/// Prefix of every token runq issues, so leaked tokens are easy to scan for.
pub const TOKEN_PREFIX: &str = "runq_";

/// The digest a token is stored and looked up by.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Creates tenant `name`, or returns the existing one of that name.
///
/// # Errors
///
/// Database errors.
pub async fn ensure(conn: &mut PgConnection, name: &str) -> Result<TenantId, DbError> {
    let id = sqlx::query_scalar!(
        r#"
        WITH inserted AS (
            INSERT INTO tenants (id, name) VALUES ($1, $2)
            ON CONFLICT (name) DO NOTHING RETURNING id
        )
        SELECT id AS "id!" FROM inserted
        UNION ALL
        SELECT id FROM tenants WHERE name = $2
        LIMIT 1
        "#,
        Uuid::now_v7(),
        name,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(id)
}

/// Issues a new token for `tenant` and returns its plaintext, which is not
/// stored and cannot be shown again.
///
/// # Errors
///
/// Database errors.
pub async fn create_token(
    conn: &mut PgConnection,
    tenant: TenantId,
    name: &str,
) -> Result<String, DbError> {
    let token = format!(
        "{TOKEN_PREFIX}{}",
        Alphanumeric.sample_string(&mut rand::rng(), 40)
    );
    sqlx::query!(
        "INSERT INTO api_tokens (id, tenant_id, name, token_hash) VALUES ($1, $2, $3, $4)",
        Uuid::now_v7(),
        tenant,
        name,
        token_hash(&token),
    )
    .execute(&mut *conn)
    .await?;
    Ok(token)
}

/// The tenant a (not revoked) token belongs to.
///
/// # Errors
///
/// Database errors.
pub async fn tenant_for_token(
    conn: &mut PgConnection,
    token: &str,
) -> Result<Option<TenantId>, DbError> {
    Ok(sqlx::query_scalar!(
        "SELECT tenant_id FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
        token_hash(token),
    )
    .fetch_optional(&mut *conn)
    .await?)
}

/// Creates project `name` of `tenant`.
///
/// # Errors
///
/// Database errors, including a duplicate name.
pub async fn create_project(
    conn: &mut PgConnection,
    tenant: TenantId,
    name: &str,
    environment: &str,
    target_url: Option<&str>,
) -> Result<Uuid, DbError> {
    let id = Uuid::now_v7();
    sqlx::query!(
        "INSERT INTO projects (id, tenant_id, name, environment, target_url)
         VALUES ($1, $2, $3, $4, $5)",
        id,
        tenant,
        name,
        environment,
        target_url,
    )
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

/// Which of the `(tenant, project)` pairs exist.
///
/// # Errors
///
/// Database errors.
pub async fn projects_owned(
    conn: &mut PgConnection,
    tenants: &[TenantId],
    projects: &[Uuid],
) -> Result<Vec<(TenantId, Uuid)>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT p.tenant_id, p.id FROM projects p
           JOIN unnest($1::uuid[], $2::uuid[]) AS w(tenant_id, id)
             ON w.tenant_id = p.tenant_id AND w.id = p.id"#,
        tenants,
        projects,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.tenant_id, row.id))
        .collect())
}
