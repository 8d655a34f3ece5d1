//! What happens during a run: its events, the outbox event relays deliver,
//! and the step envelope handlers receive.

use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::*;

/// Something that happened during a run: a step's reply, a log line.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Event {
    /// Increasing id; events of a run sort by it.
    pub id: i64,
    /// The attempt during which it happened.
    pub attempt: i32,
    /// The step that recorded it, if any.
    pub position: Option<i32>,
    /// What kind of event (`http.response`, `log`, ...).
    pub kind: String,
    /// Event data. An ingested event whose data exceeded 64 KB holds
    /// `{"truncated": true, "original_bytes": n, "data": "<the first bytes
    /// of the original JSON text>"}` instead (and `truncated` is true).
    pub data: Value,
    /// Whether `data` was cut down to 64 KB when the event was ingested.
    pub truncated: bool,
    /// When the sender says it happened (ingested events that gave it).
    pub occurred_at: Option<DateTime<Utc>>,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

/// An event a handler records while a step executes.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// What kind of event (`http.response`, `log`, ...).
    pub kind: String,
    /// Event data.
    pub data: Value,
}

/// The state changes that write an outbox row.
#[derive(Enum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// API or library insert.
    #[serde(rename = "run.created")]
    #[oai(rename = "run.created")]
    Created,
    /// A worker claimed it.
    #[serde(rename = "run.started")]
    #[oai(rename = "run.started")]
    Started,
    /// Every step succeeded.
    #[serde(rename = "run.succeeded")]
    #[oai(rename = "run.succeeded")]
    Succeeded,
    /// Failed with attempts left: pending again after a backoff.
    #[serde(rename = "run.retrying")]
    #[oai(rename = "run.retrying")]
    Retrying,
    /// Failed with no attempts left.
    #[serde(rename = "run.failed")]
    #[oai(rename = "run.failed")]
    Failed,
    /// Cancelled by a client.
    #[serde(rename = "run.cancelled")]
    #[oai(rename = "run.cancelled")]
    Cancelled,
    /// Stopped by a duration or event cap.
    #[serde(rename = "run.stopped")]
    #[oai(rename = "run.stopped")]
    Stopped,
    /// A shutting-down worker handed it back unfinished, without charging the attempt.
    #[serde(rename = "run.released")]
    #[oai(rename = "run.released")]
    Released,
    /// A client retried a finished run.
    #[serde(rename = "run.requeued")]
    #[oai(rename = "run.requeued")]
    Requeued,
}

impl EventType {
    /// Every event type, in the order of a run's life.
    pub const ALL: [EventType; 9] = [
        EventType::Created,
        EventType::Started,
        EventType::Succeeded,
        EventType::Retrying,
        EventType::Failed,
        EventType::Cancelled,
        EventType::Stopped,
        EventType::Released,
        EventType::Requeued,
    ];

    /// The event type named `name` (`run.created`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The name stored in `outbox.event_type` and the payload's `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Created => "run.created",
            EventType::Started => "run.started",
            EventType::Succeeded => "run.succeeded",
            EventType::Retrying => "run.retrying",
            EventType::Failed => "run.failed",
            EventType::Cancelled => "run.cancelled",
            EventType::Stopped => "run.stopped",
            EventType::Released => "run.released",
            EventType::Requeued => "run.requeued",
        }
    }
}

/// The payload of an outbox row: what relays deliver to webhooks and streams.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct OutboxEvent {
    /// Which state change.
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// When the change committed (database clock).
    pub occurred_at: DateTime<Utc>,
    /// The run as the change left it.
    pub run: RunSnapshot,
}

/// Version of [`RunEvent`], the envelope webhooks and streams deliver. A
/// change a consumer could trip over gets a new version; adding an optional
/// field does not.
pub const RUN_EVENT_VERSION: i32 = 1;

/// A published state change of a run: the body of every webhook delivery,
/// the `data` of every state-change event on the SSE streams, and the
/// outbox row it was read from, with the row's stable id. One type for all
/// of them (DESIGN.md, invariant 6); a contract test round-trips every
/// topic through each.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct RunEvent {
    /// Stable id of the event (`evt_` and its outbox position): the same on
    /// every redelivery, on every webhook and on the streams. Deduplicate on it.
    /// Webhook deliveries also send it as the `webhook-id` header.
    pub id: String,
    /// The envelope's version, 1.
    pub version: i32,
    /// Which state change; webhook topics filter on it.
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// When the change committed (database clock).
    pub occurred_at: DateTime<Utc>,
    /// The run as the change left it.
    pub run: RunSnapshot,
}

impl RunEvent {
    /// The published form of outbox row `outbox_id` holding `event`.
    pub fn from_outbox(outbox_id: i64, event: OutboxEvent) -> Self {
        Self {
            id: Self::id_of(outbox_id),
            version: RUN_EVENT_VERSION,
            event_type: event.event_type,
            occurred_at: event.occurred_at,
            run: event.run,
        }
    }

    /// The event id of outbox row `outbox_id`.
    pub fn id_of(outbox_id: i64) -> String {
        format!("evt_{outbox_id}")
    }
}

/// The part of a run an outbox event carries.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct RunSnapshot {
    /// The run's id.
    pub id: RunId,
    /// Owner.
    pub tenant_id: TenantId,
    /// Queue.
    pub queue: String,
    /// Status after the change.
    pub status: RunStatus,
    /// Attempts started so far.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Earliest next start.
    pub run_at: DateTime<Utc>,
    /// Why it failed or stopped.
    pub error: Option<RunError>,
    /// Output of the last step.
    pub result: Option<Value>,
}

/// What a handler receives: the step envelope. The `http` handler POSTs it
/// as the request body.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StepInput {
    /// The run being executed.
    pub id: RunId,
    /// The run's current attempt.
    pub attempt: i32,
    /// This step's index.
    pub position: i32,
    /// This step's name.
    pub name: String,
    /// This step's input, as submitted.
    pub input: Value,
    /// The previous step's output (`null` for the first step).
    pub prev: Value,
    /// Every earlier step's output, in order.
    pub results: Vec<Value>,
    /// The run's metadata.
    pub metadata: Value,
    /// The run's project (its `target_url` is where the target is), or
    /// null for a run without one.
    #[serde(default)]
    pub project: Option<crate::tenancy::StepProject>,
}

/// A page of `GET /v1/runs/{id}/events`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct EventPage {
    /// Events, oldest first.
    pub events: Vec<Event>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_cursor: Option<i64>,
}
