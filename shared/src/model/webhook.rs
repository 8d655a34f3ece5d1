//! Webhook subscriptions and their deliveries (`/v1/webhooks`).

use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::*;

/// Longest webhook URL, in bytes.
pub const MAX_WEBHOOK_URL_LEN: usize = 2048;
/// The form of a webhook URL, as the OpenAPI document states it (the
/// `pattern` of `CreateWebhook.url`): `http(s)://`, a host name whose last
/// label starts with a letter or an IPv4 address, an optional port, then
/// printable ASCII.
pub const WEBHOOK_URL_PATTERN: &str = "^https?://(([A-Za-z0-9-]+\\.)*[A-Za-z][A-Za-z0-9-]*|((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9]))(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?([/?#][!-~]*)?$";
/// Most webhook subscriptions one tenant may have.
pub const MAX_WEBHOOKS_PER_TENANT: i64 = 50;

/// A webhook subscription: where a tenant's run events are delivered.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Webhook {
    /// Its id.
    pub id: Uuid,
    /// Where deliveries are POSTed.
    pub url: String,
    /// The event types delivered; empty means every type.
    pub topics: Vec<EventType>,
    /// A note for people.
    pub description: Option<String>,
    /// Disabled subscriptions receive nothing: events published while a
    /// subscription is disabled are not delivered later.
    pub enabled: bool,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it was last changed.
    pub updated_at: DateTime<Utc>,
}

/// The answer of `POST /v1/webhooks`: the subscription and its signing
/// secret, shown this once.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CreatedWebhook {
    /// The subscription.
    pub webhook: Webhook,
    /// The Standard Webhooks signing secret (`whsec_` and base64 of 32 random
    /// bytes). Verify each delivery's `webhook-signature` with it; it is not
    /// shown again.
    pub secret: String,
}

/// The body of `POST /v1/webhooks`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// An `http` or `https` URL with a host name or an IPv4 address, an
    /// optional port and printable ASCII after it, up to 2,048 bytes.
    /// Workers refuse to deliver to private, loopback, link-local and
    /// metadata addresses unless their outbound allow-list permits them.
    #[oai(validator(
        max_length = 2048,
        pattern = "^https?://(([A-Za-z0-9-]+\\.)*[A-Za-z][A-Za-z0-9-]*|((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9]))(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?([/?#][!-~]*)?$"
    ))]
    pub url: String,
    /// The event types to deliver (up to 9, no repeats); absent or empty:
    /// every type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none, validator(max_items = 9, unique_items))]
    pub topics: Option<Vec<EventType>>,
    /// A note for people, up to 255 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none, validator(max_length = 255))]
    pub description: Option<String>,
    /// Whether it receives events; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub enabled: Option<bool>,
}

/// The body of `PATCH /v1/webhooks/{id}`: the fields to change.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct UpdateWebhook {
    /// A new URL (as in `CreateWebhook.url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(
        skip_serializing_if_is_none,
        validator(
            max_length = 2048,
            pattern = "^https?://(([A-Za-z0-9-]+\\.)*[A-Za-z][A-Za-z0-9-]*|((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9]))(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?([/?#][!-~]*)?$"
        )
    )]
    pub url: Option<String>,
    /// New topics (empty: every type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none, validator(max_items = 9, unique_items))]
    pub topics: Option<Vec<EventType>>,
    /// A new note, up to 255 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none, validator(max_length = 255))]
    pub description: Option<String>,
    /// Turn deliveries on or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub enabled: Option<bool>,
}

/// The answer of `GET /v1/webhooks`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WebhookList {
    /// The tenant's subscriptions, oldest first.
    pub webhooks: Vec<Webhook>,
}

/// Where a delivery stands.
#[derive(Enum, sqlx::Type, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[sqlx(type_name = "delivery_state", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
#[oai(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting for its next attempt, or for an earlier event of the same run
    /// to be delivered first. The relay's fan-out creates it; a failed
    /// attempt with attempts left and a redelivery put it back.
    Pending,
    /// A relay is sending it now. If that relay dies, another takes it again
    /// once the attempt's lease ends.
    Delivering,
    /// The receiver answered 2xx.
    Delivered,
    /// No attempts left. Later events of the same run are delivered anyway.
    /// Redelivery makes it pending again.
    Dead,
}

/// One attempt of a delivery.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeliveryAttempt {
    /// 1 for the first attempt; counts on across redeliveries.
    pub attempt: i32,
    /// When it was sent.
    pub started_at: DateTime<Utc>,
    /// How long until the reply, the error or the timeout.
    pub duration_ms: i32,
    /// The reply's HTTP status, if one came.
    pub status_code: Option<i32>,
    /// Why it did not count as delivered: a status outside 2xx, a timeout, a
    /// refused address, a redirect (not followed), a reply over the size cap.
    pub error: Option<String>,
}

/// One event for one subscription, with its attempts.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The delivery's id.
    pub id: i64,
    /// The event delivered (the body's `id` and the `webhook-id` header).
    pub event_id: String,
    /// The event's type.
    pub event_type: EventType,
    /// The run it is about.
    pub run_id: RunId,
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: i32,
    /// When the next attempt is due (pending), or when the current one's
    /// lease ends (delivering); null once delivered or dead.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the relay created it.
    pub created_at: DateTime<Utc>,
    /// When it was delivered or declared dead.
    pub finished_at: Option<DateTime<Utc>>,
    /// Every attempt, oldest first.
    pub attempt_log: Vec<DeliveryAttempt>,
}

/// A page of `GET /v1/webhooks/{id}/deliveries`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeliveryPage {
    /// Deliveries, newest first.
    pub deliveries: Vec<Delivery>,
    /// Pass as `before` for the next page; absent on the last page.
    pub next_cursor: Option<i64>,
}
