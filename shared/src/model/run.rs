//! A run as the API returns it: its steps, its errors and attempt history,
//! and pages of runs.

use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::*;

/// Why a run or a step failed or stopped. Stored in `runs.error` and
/// `run_steps.error`, and carried by outbox events.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RunError {
    /// Machine-readable cause.
    pub reason: ErrorReason,
    /// What happened, for people.
    pub message: String,
    /// The step that failed, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub position: Option<i32>,
}

impl RunError {
    /// An error of `reason` with `message`, made storable: `\u0000`, which
    /// Postgres cannot store, becomes U+FFFD, so a handler's message can never
    /// sink the batch its outcome is written in.
    pub fn new(reason: ErrorReason, message: impl Into<String>, position: Option<i32>) -> Self {
        let mut message = message.into();
        if message.contains('\0') {
            message = message.replace('\0', "\u{FFFD}");
        }
        Self {
            reason,
            message,
            position,
        }
    }
}

/// Machine-readable causes of a failure.
#[derive(Enum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[oai(rename_all = "snake_case")]
pub enum ErrorReason {
    /// A step's handler returned an error.
    StepFailed,
    /// A step exceeded its own timeout.
    StepTimeout,
    /// No handler is registered for the step's kind on the worker that claimed it.
    UnknownStepKind,
    /// The worker holding the run stopped heartbeating; the rescuer took it back.
    LeaseExpired,
    /// The run exceeded its duration cap.
    DurationCap,
    /// The run recorded more events than its tenant's `run_events` quota
    /// allows; the events up to the cap are kept.
    EventCap,
    /// A client cancelled the run.
    Cancelled,
    /// A step's output or events cannot be stored (`\u0000` in a string, or
    /// nesting too deep); the message names where.
    OutputUnstorable,
    /// A step's output, events or `http` reply exceed the worker's size cap.
    OutputTooLarge,
    /// The database refused this run's write alone; the message is its reason.
    WriteRefused,
    /// The worker's executor crashed while running the attempt.
    ExecutorPanicked,
    /// A step's outbound request was refused before it was sent: its URL
    /// (or a redirect) leads to a loopback, private, link-local or other
    /// internal address that the worker's `RUNQ_OUTBOUND_ALLOW` does not
    /// list. The message names the host and the address.
    OutboundRefused,
}

/// One attempt that ended without success, in a run's history (`errors`).
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AttemptError {
    /// The attempt (counting from 1 again after a client's retry).
    pub attempt: i32,
    /// When it ended (database clock).
    pub at: DateTime<Utc>,
    /// Machine-readable cause.
    pub reason: ErrorReason,
    /// What happened, for people.
    pub message: String,
    /// The step that failed, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub position: Option<i32>,
    /// The worker that held the run (none for a run cancelled while pending).
    #[serde(default)]
    pub worker_id: Option<WorkerId>,
}

/// A run as the API returns it.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Run {
    /// Time-ordered id (UUIDv7).
    pub id: RunId,
    /// Owner.
    pub tenant_id: TenantId,
    /// Project, if the run was filed under one.
    pub project_id: Option<Uuid>,
    /// Queue it waits in.
    pub queue: String,
    /// Higher runs first.
    pub priority: i16,
    /// Current status.
    pub status: RunStatus,
    /// Earliest next start.
    pub run_at: DateTime<Utc>,
    /// Attempts started so far.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Seconds the run may take.
    pub timeout_seconds: Option<i32>,
    /// The metadata given at creation.
    pub metadata: Value,
    /// The idempotency key given at creation.
    pub idempotency_key: Option<String>,
    /// The sequence key given at creation: runs of the tenant with the same
    /// key run one at a time, in enqueue order.
    pub sequence_key: Option<String>,
    /// The run is pending behind an earlier run of its sequence key (one
    /// still pending, running, failed or stopped) and is not claimable yet.
    pub sequence_waiting: bool,
    /// A client asked to cancel the running run; the worker stops it.
    pub cancel_requested: bool,
    /// Output of the last step, once the run succeeded.
    pub result: Option<Value>,
    /// Why the latest attempt failed or stopped.
    pub error: Option<Value>,
    /// Every attempt that ended without success, oldest first (kept across
    /// retries).
    pub errors: Vec<AttemptError>,
    /// When the run was accepted.
    pub created_at: DateTime<Utc>,
    /// When the latest attempt was claimed: its lease began. A worker may hold
    /// a claimed run in its bounded prefetch buffer before its first step
    /// starts (each step's own `started_at` says when it ran); the run's
    /// duration cap counts from when execution starts, not from here.
    pub started_at: Option<DateTime<Utc>>,
    /// When the run reached a terminal status.
    pub finished_at: Option<DateTime<Utc>>,
}

/// A step of a run as the API returns it.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Step {
    /// Zero-based index in the pipeline.
    pub position: i32,
    /// Name given at creation.
    pub name: String,
    /// Handler kind.
    pub kind: String,
    /// Input given at creation.
    pub input: Value,
    /// Seconds the step may take.
    pub timeout_seconds: Option<i32>,
    /// Current status.
    pub status: StepStatus,
    /// The run attempt that last finished this step (0: never ran).
    pub attempt: i32,
    /// The handler's output, once the step succeeded.
    pub output: Option<Value>,
    /// Why the step failed.
    pub error: Option<Value>,
    /// When the step last started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the step last finished.
    pub finished_at: Option<DateTime<Utc>>,
}

/// A run with its steps: `GET /v1/runs/{id}`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RunDetail {
    /// The run.
    #[oai(flatten)]
    #[serde(flatten)]
    pub run: Run,
    /// Its steps, in order.
    pub steps: Vec<Step>,
}

/// A page of `GET /v1/runs`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RunPage {
    /// Runs, newest first.
    pub runs: Vec<Run>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<RunId>,
}
