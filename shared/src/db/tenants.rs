//! Tenants: creating them and finding them by name.
//! Tokens are in [`super::tokens`], projects in [`super::projects`].

use sqlx::PgConnection;
use uuid::Uuid;

use super::{tokens, DbError};
use crate::model::TenantId;
use crate::tenancy::Scope;

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

/// Creates tenant `name`, or finds the existing tenant of that name.
/// Returns its id and whether it was created. Its plan is kept with its
/// quotas ([`crate::db::quotas`]).
///
/// # Errors
///
/// Database errors.
pub async fn create(conn: &mut PgConnection, name: &str) -> Result<(TenantId, bool), DbError> {
    let row = sqlx::query!(
        r#"
        INSERT INTO tenants (id, name) VALUES ($1, $2)
        ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
        RETURNING id, (xmax = 0) AS "created!"
        "#,
        Uuid::now_v7(),
        name,
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok((row.id, row.created))
}

/// The tenant named `name`.
///
/// # Errors
///
/// [`DbError::TenantNotFound`], else database errors.
pub async fn find(conn: &mut PgConnection, name: &str) -> Result<TenantId, DbError> {
    sqlx::query_scalar!("SELECT id FROM tenants WHERE name = $1", name)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| DbError::TenantNotFound(name.to_owned()))
}

/// Issues a token with the `admin` and `runs` scopes for `tenant` and
/// returns its plaintext, which is not stored and cannot be shown again:
/// what `runq dev`, the load tool and the tests use.
///
/// # Errors
///
/// Database errors.
pub async fn create_token(
    conn: &mut PgConnection,
    tenant: TenantId,
    name: &str,
) -> Result<String, DbError> {
    let issued = tokens::create(conn, tenant, name, &[Scope::Admin, Scope::Runs], None).await?;
    Ok(issued.plaintext)
}
