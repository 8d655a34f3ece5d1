//! `/v1/webhooks`: a tenant's webhook subscriptions and their deliveries
//! (scope `admin`). Creating, changing and deleting a subscription is written
//! to the audit log in the same transaction.

use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, OpenApi, Tags};
use runq_shared::db::{audit, webhooks};
use runq_shared::{
    CreateWebhook, CreatedWebhook, DeliveryPage, DeliveryState, Scope, UpdateWebhook, Webhook,
    WebhookList,
};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::auth::TenantAuth;
use crate::body::ApiJson;
use crate::error::ApiError;

#[derive(Tags)]
enum Tag {
    /// Webhooks: signed deliveries of run events to your endpoints (scope `admin`).
    Webhooks,
}

/// Answer of `POST /v1/webhooks`.
#[derive(ApiResponse)]
pub enum CreateWebhookResponse {
    /// The subscription was created; its secret is shown this once.
    #[oai(status = 201)]
    Created(Json<CreatedWebhook>),
}

/// Answer of `DELETE /v1/webhooks/{id}`.
#[derive(ApiResponse)]
pub enum DeleteWebhookResponse {
    /// The subscription and its deliveries are deleted.
    #[oai(status = 204)]
    Deleted,
}

/// Answer of `POST /v1/webhooks/{id}/deliveries/{delivery_id}/redeliver`.
#[derive(ApiResponse)]
pub enum RedeliverResponse {
    /// The delivery is pending again and due now.
    #[oai(status = 202)]
    Accepted,
}

/// The webhook endpoints.
pub struct WebhooksApi {
    pub(crate) pool: PgPool,
}

/// Attempts a redelivery gets (the workers' default allowance).
const REDELIVER_ATTEMPTS: i32 = 10;

fn target(id: Uuid) -> String {
    format!("webhook:{id}")
}

/// Refuses topics named twice.
fn check_topics(topics: Option<&[runq_shared::EventType]>) -> Result<(), ApiError> {
    let topics = topics.unwrap_or_default();
    for (i, topic) in topics.iter().enumerate() {
        if topics[..i].contains(topic) {
            return Err(ApiError::Unprocessable(format!(
                "topics: '{}' is listed twice",
                topic.as_str()
            )));
        }
    }
    Ok(())
}

/// Refuses a URL outside the spec's pattern, or that does not parse as an
/// absolute `http(s)` URL with a host.
fn check_url(url: &str) -> Result<(), ApiError> {
    static PATTERN: std::sync::OnceLock<Option<regex::Regex>> = std::sync::OnceLock::new();
    let pattern = PATTERN.get_or_init(|| regex::Regex::new(runq_shared::WEBHOOK_URL_PATTERN).ok());
    if !pattern.as_ref().is_some_and(|p| p.is_match(url)) {
        return Err(ApiError::Unprocessable(format!(
            "url '{url}' must be http(s):// with a host name or an IPv4 address, an optional \
             port, then printable ASCII (the pattern in the spec)"
        )));
    }
    let parsed = url::Url::parse(url)
        .map_err(|err| ApiError::Unprocessable(format!("url '{url}' is not a URL: {err}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(ApiError::Unprocessable(format!(
            "url '{url}' must be an http:// or https:// URL with a host"
        )));
    }
    Ok(())
}

#[OpenApi(prefix_path = "/v1", tag = "Tag::Webhooks")]
impl WebhooksApi {
    /// Create a webhook subscription
    ///
    /// Scope `admin`. Every event of the tenant's runs whose type is in
    /// `topics` (all types when empty) is POSTed to `url` as a `RunEvent`,
    /// signed as Standard Webhooks (`webhook-id`, `webhook-timestamp`,
    /// `webhook-signature`: `v1,` and base64 HMAC-SHA256 of
    /// `{id}.{timestamp}.{body}` under the secret). Events of one run arrive
    /// in order; a 2xx reply within the timeout (10 s by default) counts as
    /// delivered, anything else is retried with exponential backoff until the
    /// attempts run out (10 by default) and the delivery is dead. Delivery is
    /// at least once: deduplicate on the body's `id` (= `webhook-id`).
    /// Redirects are not followed. At most 50 subscriptions per tenant.
    #[oai(path = "/webhooks", method = "post", operation_id = "create_webhook")]
    async fn create(
        &self,
        auth: TenantAuth,
        body: ApiJson<CreateWebhook>,
    ) -> Result<CreateWebhookResponse, ApiError> {
        auth.0.require(Scope::Admin)?;
        check_url(&body.0.url)?;
        check_topics(body.0.topics.as_deref())?;
        let secret = runq_shared::signing::new_secret();
        let mut tx = self.pool.begin().await?;
        let webhook = webhooks::create(&mut tx, auth.0.tenant_id, &body.0, &secret).await?;
        audit::record(
            &mut tx,
            auth.0.tenant_id,
            &auth.0.actor(),
            audit::WEBHOOK_CREATE,
            &target(webhook.id),
            json!({ "url": webhook.url, "topics": webhook.topics }),
        )
        .await?;
        tx.commit().await?;
        Ok(CreateWebhookResponse::Created(Json(CreatedWebhook {
            webhook,
            secret,
        })))
    }

    /// List webhook subscriptions
    ///
    /// Scope `admin`. Oldest first; secrets are never shown again.
    #[oai(path = "/webhooks", method = "get", operation_id = "list_webhooks")]
    async fn list(&self, auth: TenantAuth) -> Result<Json<WebhookList>, ApiError> {
        auth.0.require(Scope::Admin)?;
        let mut conn = self.pool.acquire().await?;
        let webhooks = webhooks::list(&mut conn, auth.0.tenant_id).await?;
        Ok(Json(WebhookList { webhooks }))
    }

    /// Get a webhook subscription
    ///
    /// Scope `admin`.
    #[oai(path = "/webhooks/:id", method = "get", operation_id = "get_webhook")]
    async fn get(&self, auth: TenantAuth, id: Path<Uuid>) -> Result<Json<Webhook>, ApiError> {
        auth.0.require(Scope::Admin)?;
        let mut conn = self.pool.acquire().await?;
        Ok(Json(
            webhooks::get(&mut conn, auth.0.tenant_id, id.0).await?,
        ))
    }

    /// Change a webhook subscription
    ///
    /// Scope `admin`. Changes the fields given. Events published while a
    /// subscription is disabled are not delivered later.
    #[oai(
        path = "/webhooks/:id",
        method = "patch",
        operation_id = "update_webhook"
    )]
    async fn update(
        &self,
        auth: TenantAuth,
        id: Path<Uuid>,
        body: ApiJson<UpdateWebhook>,
    ) -> Result<Json<Webhook>, ApiError> {
        auth.0.require(Scope::Admin)?;
        if let Some(url) = &body.0.url {
            check_url(url)?;
        }
        check_topics(body.0.topics.as_deref())?;
        let mut tx = self.pool.begin().await?;
        let webhook = webhooks::update(&mut tx, auth.0.tenant_id, id.0, &body.0).await?;
        audit::record(
            &mut tx,
            auth.0.tenant_id,
            &auth.0.actor(),
            audit::WEBHOOK_UPDATE,
            &target(webhook.id),
            json!({ "change": body.0 }),
        )
        .await?;
        tx.commit().await?;
        Ok(Json(webhook))
    }

    /// Delete a webhook subscription
    ///
    /// Scope `admin`. Its pending deliveries are dropped with it.
    #[oai(
        path = "/webhooks/:id",
        method = "delete",
        operation_id = "delete_webhook"
    )]
    async fn delete(
        &self,
        auth: TenantAuth,
        id: Path<Uuid>,
    ) -> Result<DeleteWebhookResponse, ApiError> {
        auth.0.require(Scope::Admin)?;
        let mut tx = self.pool.begin().await?;
        let webhook = webhooks::delete(&mut tx, auth.0.tenant_id, id.0).await?;
        audit::record(
            &mut tx,
            auth.0.tenant_id,
            &auth.0.actor(),
            audit::WEBHOOK_DELETE,
            &target(webhook.id),
            json!({ "url": webhook.url }),
        )
        .await?;
        tx.commit().await?;
        Ok(DeleteWebhookResponse::Deleted)
    }

    /// List a subscription's deliveries
    ///
    /// Scope `admin`. Newest first, each with every attempt: when, how long,
    /// the reply's status and why it failed. Pass `next_cursor` of a page as
    /// `before` for the next one.
    #[oai(
        path = "/webhooks/:id/deliveries",
        method = "get",
        operation_id = "list_webhook_deliveries"
    )]
    async fn deliveries(
        &self,
        auth: TenantAuth,
        id: Path<Uuid>,
        /// Only deliveries in this state.
        state: Query<Option<DeliveryState>>,
        /// `next_cursor` of the previous page.
        before: Query<Option<i64>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<DeliveryPage>, ApiError> {
        auth.0.require(Scope::Admin)?;
        let limit = i64::from(limit.0.unwrap_or(50));
        let mut conn = self.pool.acquire().await?;
        Ok(Json(
            webhooks::list_deliveries(&mut conn, auth.0.tenant_id, id.0, state.0, before.0, limit)
                .await?,
        ))
    }

    /// Redeliver a delivery
    ///
    /// Scope `admin`. Makes a dead (or delivered, or pending) delivery due
    /// now, with 10 more attempts. 409 while an attempt is in
    /// flight. Later events of the same run wait behind it again.
    #[oai(
        path = "/webhooks/:id/deliveries/:delivery_id/redeliver",
        method = "post",
        operation_id = "redeliver_webhook_delivery"
    )]
    async fn redeliver(
        &self,
        auth: TenantAuth,
        id: Path<Uuid>,
        delivery_id: Path<i64>,
    ) -> Result<RedeliverResponse, ApiError> {
        auth.0.require(Scope::Admin)?;
        let mut conn = self.pool.acquire().await?;
        webhooks::redeliver(
            &mut conn,
            auth.0.tenant_id,
            id.0,
            delivery_id.0,
            REDELIVER_ATTEMPTS,
        )
        .await?;
        Ok(RedeliverResponse::Accepted)
    }
}
