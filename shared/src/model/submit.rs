//! What clients send: runs to submit (with the checks the type system cannot
//! make), batches, and bulk retries.

use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::*;

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
    /// Runs of the tenant with the same sequence key run one at a time, in
    /// enqueue order, while runs with other keys or none flow freely. A run
    /// that fails or is stopped keeps the key (the runs behind it wait)
    /// until it succeeds after a retry or is cancelled. 1 to 255
    /// characters, no control characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    #[oai(validator(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*$"
    ))]
    pub sequence_key: Option<String>,
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
            sequence_key: None,
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
        if let Some(key) = &self.sequence_key {
            if key.is_empty() || key.chars().count() > MAX_SEQUENCE_KEY_LEN {
                return Err(InvalidRun(format!(
                    "sequence_key '{}' must be 1 to {MAX_SEQUENCE_KEY_LEN} characters",
                    truncate(key)
                )));
            }
            if key.chars().any(char::is_control) {
                return Err(InvalidRun(format!(
                    "sequence_key '{}' contains a control character",
                    truncate(key)
                )));
            }
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
