//! The audit log: who changed a tenant's settings, when, and how. Rows are
//! only ever inserted (a trigger refuses UPDATE, DELETE and TRUNCATE), in the
//! transaction of the change they record, so a change and its row commit
//! together.

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::DbError;
use crate::model::TenantId;
use crate::tenancy::AuditEntry;

/// A token was issued.
pub const TOKEN_CREATE: &str = "token.create";
/// A token was revoked.
pub const TOKEN_REVOKE: &str = "token.revoke";
/// A tenant was created, or its plan set, by an operator.
pub const TENANT_CREATE: &str = "tenant.create";
/// A project was created.
pub const PROJECT_CREATE: &str = "project.create";
/// A project was deleted.
pub const PROJECT_DELETE: &str = "project.delete";
/// A project's production override was turned on.
pub const OVERRIDE_ENABLE: &str = "project.production_override.enable";
/// A project's production override was turned off.
pub const OVERRIDE_DISABLE: &str = "project.production_override.disable";
/// A tenant's quotas (plan or overrides) were changed.
pub const QUOTA_UPDATE: &str = "quota.update";
/// Many runs were retried in one request.
pub const RUNS_BULK_RETRY: &str = "runs.bulk_retry";
/// A webhook subscription was created.
pub const WEBHOOK_CREATE: &str = "webhook.create";
/// A webhook subscription was changed.
pub const WEBHOOK_UPDATE: &str = "webhook.update";
/// A webhook subscription was deleted.
pub const WEBHOOK_DELETE: &str = "webhook.delete";

/// Who acted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// An API token (its id).
    Token(Uuid),
    /// An operator using the CLI against the database (their user name).
    Operator(String),
}

impl Actor {
    /// The actor as the log shows it: `token:<id>` or `operator:<user>`.
    pub fn label(&self) -> String {
        match self {
            Actor::Token(id) => format!("token:{id}"),
            Actor::Operator(user) => format!("operator:{user}"),
        }
    }

    /// The acting token, if a token acted.
    pub fn token_id(&self) -> Option<Uuid> {
        match self {
            Actor::Token(id) => Some(*id),
            Actor::Operator(_) => None,
        }
    }
}

/// Appends an entry to `tenant`'s audit log: `actor` did `action` (one of
/// this module's constants, or a new `family.verb`) to `target`
/// (`project:<id>`, `token:<id>`, ...), with `details`. Call it inside the
/// transaction that makes the change.
///
/// # Errors
///
/// Database errors.
pub async fn record(
    conn: &mut PgConnection,
    tenant: TenantId,
    actor: &Actor,
    action: &str,
    target: &str,
    details: Value,
) -> Result<i64, DbError> {
    Ok(sqlx::query_scalar!(
        "INSERT INTO audit_log (tenant_id, actor_token_id, actor, action, target, details)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        tenant,
        actor.token_id(),
        actor.label(),
        action,
        target,
        details,
    )
    .fetch_one(&mut *conn)
    .await?)
}

/// Up to `limit` of `tenant`'s entries, newest first, older than `before`
/// (an entry id) and of `action` when given.
///
/// # Errors
///
/// Database errors.
pub async fn list(
    conn: &mut PgConnection,
    tenant: TenantId,
    action: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditEntry>, DbError> {
    Ok(sqlx::query_as!(
        AuditEntry,
        "SELECT id, actor, actor_token_id, action, target, details, created_at
         FROM audit_log
         WHERE tenant_id = $1 AND ($2::text IS NULL OR action = $2)
           AND ($3::bigint IS NULL OR id < $3)
         ORDER BY id DESC LIMIT $4",
        tenant,
        action,
        before,
        limit,
    )
    .fetch_all(&mut *conn)
    .await?)
}
