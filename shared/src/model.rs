//! The payloads that cross a process boundary: API bodies, outbox events and the
//! step envelope. Each is one type, serialised by serde and described in the
//! OpenAPI spec by poem-openapi; the contract tests check that both agree.

use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// A run's id: a UUIDv7, so ids sort by creation time.
pub type RunId = Uuid;
/// A tenant's id.
pub type TenantId = Uuid;
/// A worker process's id, written into `runs.locked_by` while it holds a lease.
pub type WorkerId = Uuid;

/// Most steps a run may have.
pub const MAX_STEPS: usize = 64;
/// Most runs one batch request or one `enqueue_many` call may insert.
pub const MAX_BATCH: usize = 1_000;
/// Longest queue name, in characters.
pub const MAX_QUEUE_LEN: usize = 64;
/// Longest step name, step kind and idempotency key, in characters.
pub const MAX_NAME_LEN: usize = 255;
/// Most attempts a run may be given.
pub const MAX_ATTEMPTS: i32 = 100;
/// Most bytes a run's `metadata` may take as compact JSON: it is copied into
/// every step's envelope.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;
/// The step kinds every worker can execute.
pub const BUILTIN_STEP_KINDS: [&str; 4] = ["http", "sleep", "echo", "fail"];

/// Where a run is in its life. Mirrors the Postgres enum `run_status`.
#[derive(sqlx::Type, Enum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[sqlx(type_name = "run_status", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
#[oai(rename_all = "snake_case")]
pub enum RunStatus {
    /// Waiting for `run_at`. Entered on enqueue, on a retry with attempts left,
    /// from the rescuer, on a worker's graceful hand-back and on an API retry.
    /// Left when a worker claims it or a client cancels it.
    Pending,
    /// Claimed by a worker holding a lease. Left by that worker's completion or
    /// by the rescuer when the lease expires.
    Running,
    /// Every step succeeded. Terminal.
    Succeeded,
    /// A step failed and no attempts are left: the dead-letter set. Left only
    /// through an API retry.
    Failed,
    /// Stopped by a duration or event cap. Left only through an API retry.
    StoppedQuota,
    /// Cancelled by a client. Left only through an API retry.
    Cancelled,
}

impl RunStatus {
    /// The status as stored and as written in URLs and payloads.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::StoppedQuota => "stopped_quota",
            RunStatus::Cancelled => "cancelled",
        }
    }

    /// Whether a run in this status is finished until someone retries it.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded
                | RunStatus::Failed
                | RunStatus::StoppedQuota
                | RunStatus::Cancelled
        )
    }
}

/// Where a step is. Mirrors the Postgres enum `step_status`.
#[derive(sqlx::Type, Enum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[sqlx(type_name = "step_status", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
#[oai(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not yet finished by any attempt (also a step that is executing now).
    Pending,
    /// Finished; its output is checkpointed and a retried run skips it.
    Succeeded,
    /// Failed on the run's latest attempt.
    Failed,
}

/// One stage of a run's pipeline, as submitted.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct NewStep {
    /// Name shown in the run's detail; need not be unique. No `\u0000`
    /// (Postgres cannot store it).
    #[oai(validator(min_length = 1, max_length = 255, pattern = r"^[^\x00]*$"))]
    pub name: String,
    /// The handler that executes the step: `http`, `sleep`, `echo`, `fail` or a
    /// kind the deployment accepts (`RUNQ_STEP_KINDS`, kinds its workers
    /// register); a running API's `/openapi.json` lists them as an enum.
    #[oai(validator(min_length = 1, max_length = 255, pattern = r"^[^\x00]*$"))]
    pub kind: String,
    /// Handler input, handed to the handler as given. `http`: `{"url": ...,
    /// "timeout_ms"?: ...}`; `sleep`: `{"ms": ...}`; `fail`: `{"message"?:
    /// ...}`; `echo`: anything. A step whose handler cannot use its input fails
    /// when it runs, with the handler's reason. No string or key in it may hold
    /// `\u0000` and it may nest at most 100 levels (a 422 names the place).
    #[oai(default)]
    #[serde(default)]
    pub input: Value,
    /// Seconds this step may take before it fails (and is retried like any failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    #[oai(validator(minimum(value = "1")))]
    pub timeout_seconds: Option<i32>,
}

impl NewStep {
    /// A step of `kind` named `name` with `input`.
    pub fn new(name: impl Into<String>, kind: impl Into<String>, input: Value) -> Self {
        Self {
            name: name.into(),
            kind: kind.into(),
            input,
            timeout_seconds: None,
        }
    }
}

fn default_queue() -> String {
    "default".to_owned()
}

fn default_max_attempts() -> i32 {
    3
}

/// The body of `POST /v1/runs`: what to run, where and when.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct CreateRun {
    /// Queue the run waits in; workers name the queues they serve.
    #[oai(default = "default_queue")]
    #[serde(default = "default_queue")]
    #[oai(validator(min_length = 1, max_length = 64, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$"))]
    pub queue: String,
    /// Higher runs first within a queue (-32768..=32767).
    #[oai(default)]
    #[serde(default)]
    #[oai(validator(minimum(value = "-32768"), maximum(value = "32767")))]
    pub priority: i16,
    /// Earliest start; omitted means now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub run_at: Option<DateTime<Utc>>,
    /// Attempts before the run is `failed` (1..=100).
    #[oai(default = "default_max_attempts")]
    #[serde(default = "default_max_attempts")]
    #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
    pub max_attempts: i32,
    /// Seconds the whole run may take, capped by the server's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    #[oai(validator(minimum(value = "1")))]
    pub timeout_seconds: Option<i32>,
    /// Project (target under test) the run belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub project_id: Option<Uuid>,
    /// Free-form JSON object handed to every step, unchanged: at most 65,536
    /// bytes as compact JSON. No string or key in it may hold `\u0000` and
    /// it may nest at most 100 levels (a 422 names the place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub metadata: Option<Value>,
    /// The pipeline, 1 to 64 steps, executed in order.
    #[oai(validator(min_items = 1, max_items = 64))]
    pub steps: Vec<NewStep>,
}

impl CreateRun {
    /// A run of `steps` on the `default` queue with the default settings.
    pub fn new(steps: Vec<NewStep>) -> Self {
        Self {
            queue: default_queue(),
            priority: 0,
            run_at: None,
            max_attempts: default_max_attempts(),
            timeout_seconds: None,
            project_id: None,
            metadata: None,
            steps,
        }
    }

    /// Checks what the type system cannot: sizes, ranges and step kinds.
    /// `extra_kinds` are the custom kinds this deployment accepts beside the
    /// built-in ones; `None` accepts any kind (library callers register their
    /// own handlers, which the database layer cannot know).
    ///
    /// # Errors
    ///
    /// The first problem found, naming the field and the bad value.
    pub fn validate(&self, extra_kinds: Option<&[String]>) -> Result<(), InvalidRun> {
        let queue = &self.queue;
        if queue.is_empty() || queue.chars().count() > MAX_QUEUE_LEN {
            return Err(InvalidRun(format!(
                "queue name '{}' must be 1 to {MAX_QUEUE_LEN} characters",
                truncate(queue)
            )));
        }
        if queue.chars().any(char::is_control) {
            return Err(InvalidRun(format!(
                "queue name '{}' contains a control character",
                truncate(queue)
            )));
        }
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            return Err(InvalidRun(format!(
                "max_attempts {} is outside 1..={MAX_ATTEMPTS}",
                self.max_attempts
            )));
        }
        if let Some(timeout) = self.timeout_seconds {
            if timeout < 1 {
                return Err(InvalidRun(format!(
                    "timeout_seconds {timeout} must be at least 1"
                )));
            }
        }
        if let Some(metadata) = &self.metadata {
            if !metadata.is_object() {
                return Err(InvalidRun("metadata must be a JSON object".to_owned()));
            }
            crate::storable::check("metadata", metadata).map_err(InvalidRun::from)?;
            let size = serde_json::to_vec(metadata).map_or(0, |bytes| bytes.len());
            if size > MAX_METADATA_BYTES {
                return Err(InvalidRun(format!(
                    "metadata takes {size} bytes as JSON, more than {MAX_METADATA_BYTES}"
                )));
            }
        }
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return Err(InvalidRun(format!(
                "a run needs 1 to {MAX_STEPS} steps, got {}",
                self.steps.len()
            )));
        }
        for (position, step) in self.steps.iter().enumerate() {
            step.validate(position, extra_kinds)?;
        }
        Ok(())
    }
}

impl NewStep {
    fn validate(&self, position: usize, extra_kinds: Option<&[String]>) -> Result<(), InvalidRun> {
        if self.name.is_empty() || self.name.chars().count() > MAX_NAME_LEN {
            return Err(InvalidRun(format!(
                "steps[{position}].name must be 1 to {MAX_NAME_LEN} characters"
            )));
        }
        crate::storable::check_text(&format!("steps[{position}].name"), &self.name)?;
        crate::storable::check_text(&format!("steps[{position}].kind"), &self.kind)?;
        crate::storable::check(&format!("steps[{position}].input"), &self.input)?;
        let kind = self.kind.as_str();
        if kind.is_empty() || kind.chars().count() > MAX_NAME_LEN {
            return Err(InvalidRun(format!(
                "steps[{position}].kind must be 1 to {MAX_NAME_LEN} characters"
            )));
        }
        let Some(extra_kinds) = extra_kinds else {
            return self.validate_input(position);
        };
        if !BUILTIN_STEP_KINDS.contains(&kind) && !extra_kinds.iter().any(|k| k == kind) {
            return Err(InvalidRun(format!(
                "steps[{position}].kind '{}' is not a known step kind (known: {})",
                truncate(kind),
                BUILTIN_STEP_KINDS
                    .iter()
                    .copied()
                    .chain(extra_kinds.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        self.validate_input(position)
    }

    fn validate_input(&self, position: usize) -> Result<(), InvalidRun> {
        if let Some(timeout) = self.timeout_seconds {
            if timeout < 1 {
                return Err(InvalidRun(format!(
                    "steps[{position}].timeout_seconds {timeout} must be at least 1"
                )));
            }
        }
        Ok(())
    }
}

fn truncate(value: &str) -> &str {
    match value.char_indices().nth(80) {
        Some((end, _)) => &value[..end],
        None => value,
    }
}

/// Why a run or step body was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRun(pub String);

impl From<crate::storable::Unstorable> for InvalidRun {
    fn from(err: crate::storable::Unstorable) -> Self {
        InvalidRun(err.to_string())
    }
}

/// A run to insert through [`crate::db::runs::enqueue`]: the API body plus who
/// owns it and its optional idempotency key.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// Owner of the run.
    pub tenant_id: TenantId,
    /// Same key and tenant return the existing run instead of a new one.
    pub idempotency_key: Option<String>,
    /// What to run.
    pub run: CreateRun,
}

impl NewRun {
    /// Checks the run as [`CreateRun::validate`] does (any step kind), and the
    /// idempotency key.
    ///
    /// # Errors
    ///
    /// The first problem found, naming the field.
    pub fn validate(&self) -> Result<(), InvalidRun> {
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() || key.chars().count() > MAX_NAME_LEN {
                return Err(InvalidRun(format!(
                    "idempotency key must be 1 to {MAX_NAME_LEN} characters, got {}",
                    key.chars().count()
                )));
            }
            crate::storable::check_text("idempotency key", key)?;
        }
        self.run.validate(None)
    }

    /// A digest of the request (everything but the owner and the key), kept
    /// with a keyed run so a repeated key with a different request is told
    /// apart from a retry of the same one. Defaults are filled in first, so
    /// omitting a field and sending its default are the same request; object
    /// keys are sorted (serde_json without `preserve_order`), so their order
    /// does not matter.
    pub fn request_digest(&self) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let body = serde_json::to_vec(&self.run).unwrap_or_default();
        Sha256::digest(body).to_vec()
    }

    /// A run of `steps` for `tenant_id` with default settings.
    pub fn new(tenant_id: TenantId, steps: Vec<NewStep>) -> Self {
        Self {
            tenant_id,
            idempotency_key: None,
            run: CreateRun::new(steps),
        }
    }
}

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

/// The body of `POST /v1/runs/batch`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct CreateRuns {
    /// 1 to 1,000 runs, inserted in one transaction: all or none.
    #[oai(validator(min_items = 1, max_items = 1000))]
    pub runs: Vec<CreateRun>,
}

/// The answer of `POST /v1/runs/batch`: the runs in request order.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CreatedRuns {
    /// The inserted runs.
    pub runs: Vec<Run>,
}

/// A page of `GET /v1/runs`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RunPage {
    /// Runs, newest first.
    pub runs: Vec<Run>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<RunId>,
}

/// A page of `GET /v1/runs/{id}/events`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct EventPage {
    /// Events, oldest first.
    pub events: Vec<Event>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_cursor: Option<i64>,
}

/// An RFC 9457 problem: the body of every error the API returns, served as
/// `application/problem+json`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Problem {
    /// Identifies the kind of problem (`urn:runq:problem:<slug>`).
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub problem_type: String,
    /// Short summary of the kind of problem.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request, and what to fix.
    pub detail: String,
}

fn default_retry_status() -> RetryableStatus {
    RetryableStatus::Failed
}

/// The finished statuses a client can retry runs out of.
#[derive(Enum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
#[oai(rename_all = "snake_case")]
pub enum RetryableStatus {
    /// Failed with no attempts left: the dead letters.
    Failed,
    /// Stopped by a duration or event cap.
    StoppedQuota,
    /// Cancelled by a client.
    Cancelled,
}

impl From<RetryableStatus> for RunStatus {
    fn from(status: RetryableStatus) -> Self {
        match status {
            RetryableStatus::Failed => RunStatus::Failed,
            RetryableStatus::StoppedQuota => RunStatus::StoppedQuota,
            RetryableStatus::Cancelled => RunStatus::Cancelled,
        }
    }
}

fn default_retry_limit() -> i64 {
    100
}

/// The body of `POST /v1/runs/retry`: which finished runs to revive.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct RetryRuns {
    /// `failed` (the dead letters, default), `stopped_quota` or `cancelled`.
    #[oai(default = "default_retry_status")]
    #[serde(default = "default_retry_status")]
    pub status: RetryableStatus,
    /// Only runs of this queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub queue: Option<String>,
    /// Only runs of this project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub project_id: Option<Uuid>,
    /// Most runs revived by this call, 1 to 1,000 (default 100), oldest first.
    #[oai(default = "default_retry_limit")]
    #[serde(default = "default_retry_limit")]
    #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
    pub limit: i64,
}

/// The answer of `POST /v1/runs/retry`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct RetriedRuns {
    /// The runs put back to pending, oldest first.
    pub ids: Vec<RunId>,
}

/// Most events one `POST /v1/ingest/events` may carry.
pub const MAX_INGEST_EVENTS: usize = 100;
/// Largest ingested event `data`, as compact JSON text, in bytes (64 KB);
/// larger data is stored truncated (see [`truncate_event_data`]).
pub const MAX_EVENT_DATA_BYTES: usize = 64 * 1024;
/// Seconds after a run's attempt ends (it finishes, or fails and waits for
/// its retry) during which ingest still accepts its events: a sidecar's last
/// reports may arrive after the worker has written the outcome.
pub const INGEST_GRACE_SECONDS: i64 = 60;
/// Room left in [`MAX_EVENT_DATA_BYTES`] for the wrapper of truncated data
/// (its keys, `original_bytes`, and the spaces Postgres prints).
const TRUNCATION_ENVELOPE_BYTES: usize = 128;

/// The body of `POST /v1/ingest/events`: events a sidecar reports for a run.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct IngestEvents {
    /// The run the events belong to; it must be running, or its latest
    /// attempt must have ended less than 60 s ago.
    pub run_id: RunId,
    /// 1 to 100 events, stored in order.
    #[oai(validator(min_items = 1, max_items = 100))]
    pub events: Vec<IngestEvent>,
}

/// One event of an ingest batch.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct IngestEvent {
    /// What kind of event (`log`, `metric`, ...), 1 to 255 bytes.
    #[oai(validator(min_length = 1, max_length = 255))]
    pub kind: String,
    /// Event data, any JSON. Over 64 KB (as compact JSON text) it is stored
    /// truncated and flagged.
    pub data: Value,
    /// When it happened, by the sender's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub occurred_at: Option<DateTime<Utc>>,
}

impl IngestEvents {
    /// Checks what the schema cannot: sizes in bytes, and values Postgres
    /// cannot store (`\u0000`, nesting deeper than 100 levels).
    ///
    /// # Errors
    ///
    /// The first problem found, naming the field by its path in the body
    /// (`events[3].data.x`).
    pub fn validate(&self) -> Result<(), InvalidRun> {
        if self.events.is_empty() || self.events.len() > MAX_INGEST_EVENTS {
            return Err(InvalidRun(format!(
                "events must hold 1 to {MAX_INGEST_EVENTS} events, got {}",
                self.events.len()
            )));
        }
        for (index, event) in self.events.iter().enumerate() {
            if event.kind.is_empty() || event.kind.len() > MAX_NAME_LEN {
                return Err(InvalidRun(format!(
                    "events[{index}].kind must be 1 to {MAX_NAME_LEN} bytes, got {}",
                    event.kind.len()
                )));
            }
            crate::storable::check_text(&format!("events[{index}].kind"), &event.kind)?;
            crate::storable::check(&format!("events[{index}].data"), &event.data)?;
        }
        Ok(())
    }
}

/// The answer of `POST /v1/ingest/events` when at least one event was taken.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct IngestedEvents {
    /// Events stored: the first `accepted` of the batch, in order.
    pub accepted: u32,
    /// Events refused by the rate limit: the last `rejected` of the batch.
    /// Send them again after `Retry-After` seconds.
    pub rejected: u32,
    /// How many of the accepted events were stored truncated.
    pub truncated: u32,
}

/// `data` as ingest stores it when its compact JSON text exceeds
/// [`MAX_EVENT_DATA_BYTES`]: `{"truncated": true, "original_bytes": n,
/// "data": "<prefix>"}`, where the prefix is the start of that JSON text, cut
/// on a character boundary so that the whole stored value, printed as JSON,
/// stays within 64 KB. `None` when `data` fits and is stored as sent.
pub fn truncate_event_data(data: &Value) -> Option<Value> {
    let text = data.to_string();
    if text.len() <= MAX_EVENT_DATA_BYTES {
        return None;
    }
    // The prefix is stored as a JSON string, where `"` and `\` take two
    // bytes; the compact text holds no raw control characters.
    let budget = MAX_EVENT_DATA_BYTES - TRUNCATION_ENVELOPE_BYTES;
    let mut used = 0;
    let mut end = 0;
    for (index, c) in text.char_indices() {
        let escaped = match c {
            '"' | '\\' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if used + escaped > budget {
            break;
        }
        used += escaped;
        end = index + c.len_utf8();
    }
    Some(serde_json::json!({
        "truncated": true,
        "original_bytes": text.len(),
        "data": &text[..end],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn small_event_data_is_kept_and_large_data_is_cut_within_64_kb() {
        assert_eq!(truncate_event_data(&json!({"x": "small"})), None);
        let exact = json!("a".repeat(MAX_EVENT_DATA_BYTES - 2));
        assert_eq!(truncate_event_data(&exact), None);
        // Quotes double when escaped, and 'é' takes two bytes: the cut stays
        // on a character boundary and the stored text within 64 KB.
        for filler in ["\"", "é", "x"] {
            let data = json!({ "blob": filler.repeat(100 * 1024) });
            let text = data.to_string();
            let stored = truncate_event_data(&data).expect("over 64 KB");
            assert_eq!(stored["truncated"], json!(true));
            assert_eq!(stored["original_bytes"], json!(text.len()));
            let prefix = stored["data"].as_str().expect("a string");
            assert!(text.starts_with(prefix));
            let printed = stored.to_string().len();
            assert!(printed <= MAX_EVENT_DATA_BYTES, "{filler}: {printed}");
            assert!(printed > MAX_EVENT_DATA_BYTES - 200, "{filler}: {printed}");
        }
    }

    #[test]
    fn ingest_batches_name_the_bad_field() {
        let event = |kind: &str, data: Value| IngestEvent {
            kind: kind.to_owned(),
            data,
            occurred_at: None,
        };
        let mut batch = IngestEvents {
            run_id: Uuid::nil(),
            events: vec![event("log", json!(1)); 3],
        };
        assert_eq!(batch.validate(), Ok(()));
        batch.events[2] = event("log", json!({"x": "a\u{0}b"}));
        assert_eq!(
            batch.validate().map_err(|e| e.0),
            Err("events[2].data.x contains \\u0000, which Postgres cannot store".to_owned())
        );
        batch.events[2] = event(&"k".repeat(256), json!(1));
        assert!(batch.validate().is_err());
        batch.events = vec![event("log", json!(1)); 101];
        assert!(batch.validate().is_err());
    }
}
