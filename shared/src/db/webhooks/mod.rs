//! Webhook subscriptions (`webhooks`) and their deliveries
//! (`webhook_deliveries`, `webhook_attempts`). Every query a client causes
//! is scoped to one tenant: another tenant's subscription answers
//! [`DbError::WebhookNotFound`]. The relay's statements (fan-out, claim,
//! record, prune) are in [`relay`].

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::DbError;
use crate::model::{
    CreateWebhook, EventType, TenantId, UpdateWebhook, Webhook, MAX_WEBHOOKS_PER_TENANT,
};

mod deliveries;
pub mod relay;

pub use deliveries::{list_deliveries, redeliver};

/// A subscription as stored.
struct Row {
    id: Uuid,
    url: String,
    topics: Vec<String>,
    description: Option<String>,
    enabled: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<Row> for Webhook {
    fn from(row: Row) -> Self {
        Webhook {
            id: row.id,
            url: row.url,
            // Topics are written from `EventType` names only.
            topics: row
                .topics
                .iter()
                .filter_map(|name| EventType::from_name(name))
                .collect(),
            description: row.description,
            enabled: row.enabled,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

/// `query_as!` into a subscription [`Row`]: `prefix <every column> suffix`.
macro_rules! query_webhooks {
    ($prefix:tt, $suffix:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            Row,
            $prefix
                + " id, url, topics, description, enabled, created_at, updated_at "
                + $suffix
            $(, $arg)*
        )
    };
}

fn topic_names(topics: &[EventType]) -> Vec<String> {
    topics.iter().map(|t| t.as_str().to_owned()).collect()
}

/// Creates a subscription of `tenant` signing with `secret`. Run it in a
/// transaction: the count of the tenant's subscriptions is checked under
/// the tenant's row lock, so two creations cannot both take the last place.
///
/// # Errors
///
/// [`DbError::TooManyWebhooks`] past [`MAX_WEBHOOKS_PER_TENANT`], else
/// database errors.
pub async fn create(
    conn: &mut PgConnection,
    tenant: TenantId,
    webhook: &CreateWebhook,
    secret: &str,
) -> Result<Webhook, DbError> {
    let count = sqlx::query_scalar!(
        r#"SELECT count(w.id) AS "count!"
           FROM (SELECT id FROM tenants WHERE id = $1 FOR UPDATE) t
           LEFT JOIN webhooks w ON w.tenant_id = t.id"#,
        tenant,
    )
    .fetch_one(&mut *conn)
    .await?;
    if count >= MAX_WEBHOOKS_PER_TENANT {
        return Err(DbError::TooManyWebhooks(MAX_WEBHOOKS_PER_TENANT));
    }
    let row = query_webhooks!(
        "INSERT INTO webhooks (id, tenant_id, url, topics, description, secret, enabled)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         RETURNING",
        "",
        Uuid::now_v7(),
        tenant,
        webhook.url,
        &topic_names(webhook.topics.as_deref().unwrap_or_default()),
        webhook.description,
        secret,
        webhook.enabled.unwrap_or(true),
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(row.into())
}

/// `tenant`'s subscriptions, oldest first.
///
/// # Errors
///
/// Database errors.
pub async fn list(conn: &mut PgConnection, tenant: TenantId) -> Result<Vec<Webhook>, DbError> {
    let rows = query_webhooks!(
        "SELECT",
        "FROM webhooks WHERE tenant_id = $1 ORDER BY id",
        tenant,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(Webhook::from).collect())
}

/// Subscription `id` of `tenant`.
///
/// # Errors
///
/// [`DbError::WebhookNotFound`], else database errors.
pub async fn get(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> Result<Webhook, DbError> {
    let row = query_webhooks!(
        "SELECT",
        "FROM webhooks WHERE tenant_id = $1 AND id = $2",
        tenant,
        id,
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(DbError::WebhookNotFound(id))?;
    Ok(row.into())
}

/// Changes the fields `change` gives of subscription `id` of `tenant`.
///
/// # Errors
///
/// [`DbError::WebhookNotFound`], else database errors.
pub async fn update(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    change: &UpdateWebhook,
) -> Result<Webhook, DbError> {
    let topics = change.topics.as_deref().map(topic_names);
    let row = query_webhooks!(
        "UPDATE webhooks SET
             url = coalesce($3, url),
             topics = coalesce($4, topics),
             description = coalesce($5, description),
             enabled = coalesce($6, enabled),
             updated_at = now()
         WHERE tenant_id = $1 AND id = $2
         RETURNING",
        "",
        tenant,
        id,
        change.url,
        topics.as_deref(),
        change.description,
        change.enabled,
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(DbError::WebhookNotFound(id))?;
    Ok(row.into())
}

/// Deletes subscription `id` of `tenant`, with its deliveries.
///
/// # Errors
///
/// [`DbError::WebhookNotFound`], else database errors.
pub async fn delete(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<Webhook, DbError> {
    let row = query_webhooks!(
        "DELETE FROM webhooks WHERE tenant_id = $1 AND id = $2 RETURNING",
        "",
        tenant,
        id,
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(DbError::WebhookNotFound(id))?;
    Ok(row.into())
}
