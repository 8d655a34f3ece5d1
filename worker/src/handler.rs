//! Step handlers: the [`Handler`] trait library users implement for their own
//! step kinds, the registry a worker looks kinds up in, and the built-in kinds
//! `http`, `sleep`, `echo` and `fail`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use runq_shared::{ErrorReason, NewEvent, StepInput};
use serde_json::{json, Map, Value};

use crate::outbound::{self, BodyError, OutboundError, OutboundPolicy};

/// Why a step failed. The run is retried after a backoff while attempts remain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    /// What went wrong, recorded in the step's and the run's `error`.
    pub message: String,
    /// The machine-readable cause recorded with it.
    reason: ErrorReason,
}

impl StepError {
    /// A failure with `message` (reason `step_failed`).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            reason: ErrorReason::StepFailed,
        }
    }

    /// A request the worker's outbound policy refused (reason
    /// `outbound_refused`; see [`crate::outbound`]), for handlers that make
    /// requests through [`crate::outbound::client`].
    pub fn outbound_refused(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            reason: ErrorReason::OutboundRefused,
        }
    }

    /// An output, events or reply over the worker's cap (reason
    /// `output_too_large`, `RUNQ_MAX_OUTPUT_BYTES`).
    pub fn output_too_large(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            reason: ErrorReason::OutputTooLarge,
        }
    }

    /// The reason recorded with the failure.
    pub fn reason(&self) -> ErrorReason {
        self.reason
    }
}

/// Events a step records while it executes; they are written with the step's
/// checkpoint, fenced like every write of the worker.
#[derive(Debug, Default)]
pub struct Events(pub(crate) Vec<NewEvent>);

impl Events {
    /// Records an event of `kind` with `data`.
    pub fn record(&mut self, kind: impl Into<String>, data: Value) {
        self.0.push(NewEvent {
            kind: kind.into(),
            data,
        });
    }
}

/// Executes one step kind.
///
/// Handlers must tolerate being run again for the same step: a worker that
/// dies after a step's side effect but before its checkpoint commits leaves the
/// step to be retried (at-least-once, as in every durable queue).
///
/// # Cancel safety
///
/// `execute` is dropped mid-way when the run is cancelled, exceeds a timeout
/// or loses its lease; anything it holds must clean up on drop.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The step kind this handler executes.
    fn kind(&self) -> &str;

    /// Executes `step`; the returned value becomes the step's output and the
    /// next step's `prev`.
    ///
    /// # Errors
    ///
    /// A [`StepError`] fails the step (and the attempt).
    async fn execute(&self, step: &StepInput, events: &mut Events) -> Result<Value, StepError>;
}

/// The handlers a worker knows, by kind.
#[derive(Clone)]
pub struct Handlers(HashMap<String, Arc<dyn Handler>>);

impl Handlers {
    /// The built-in handlers: `http`, `sleep`, `echo`, `fail`.
    pub fn builtin() -> Self {
        let mut handlers = Self(HashMap::new());
        handlers.register(Http::default());
        handlers.register(Sleep);
        handlers.register(Echo);
        handlers.register(Fail);
        handlers
    }

    /// Adds `handler`, replacing any handler of the same kind.
    pub fn register(&mut self, handler: impl Handler) {
        self.0.insert(handler.kind().to_owned(), Arc::new(handler));
    }

    /// The handler for `kind`.
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Handler>> {
        self.0.get(kind)
    }
}

/// `http`: POSTs the step envelope ([`StepInput`]) as JSON to `input.url`.
/// The reply's status and body become the output and an `http.response`
/// event; a reply outside 2xx fails the step, and so does a reply body larger
/// than the handler's cap (read no further than the cap).
///
/// Requests go through [`outbound::client`]: a URL (or a redirect) that
/// leads to a loopback, private, link-local or other internal address the
/// [`OutboundPolicy`] does not allow fails the step with reason
/// `outbound_refused` before anything is sent. Like every failure, it is
/// retried while attempts remain (the allow-list may change meanwhile).
pub struct Http {
    /// The guarded client, or why it could not be built (then every step
    /// fails saying so: there is no unguarded fallback).
    client: Result<reqwest::Client, String>,
    policy: OutboundPolicy,
    max_reply_bytes: usize,
}

/// Reply cap of [`Http::default`]: 1 MiB, as `RUNQ_MAX_OUTPUT_BYTES`.
pub const HTTP_DEFAULT_MAX_REPLY_BYTES: usize = 1024 * 1024;

impl Http {
    /// An `http` handler that reaches what `policy` allows and fails a step
    /// whose reply body exceeds `max_reply_bytes`.
    pub fn new(max_reply_bytes: usize, policy: OutboundPolicy) -> Self {
        let client = outbound::client(&policy, HTTP_DEFAULT_TIMEOUT).map_err(|err| {
            tracing::error!(error = %err, "the http step kind cannot work");
            err.to_string()
        });
        Self {
            client,
            policy,
            max_reply_bytes,
        }
    }
}

impl Default for Http {
    /// The default reply cap; no internal address allowed.
    fn default() -> Self {
        Self::new(HTTP_DEFAULT_MAX_REPLY_BYTES, OutboundPolicy::default())
    }
}

/// Timeout of an `http` step's request unless `input.timeout_ms` says otherwise.
const HTTP_DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The step error for a failed request to `url`: `outbound_refused` when
/// the outbound policy refused it (the message names the host refused,
/// which after a redirect is not `url`'s), else a plain failure.
fn request_failed(url: &str, err: &reqwest::Error) -> StepError {
    match OutboundError::find(err) {
        Some(cause) if cause.is_refusal() => {
            StepError::outbound_refused(format!("POST {url}: {cause}"))
        }
        Some(cause) => StepError::new(format!("POST {url}: {cause}")),
        None => StepError::new(format!("POST {url}: {err}")),
    }
}

#[async_trait]
impl Handler for Http {
    fn kind(&self) -> &str {
        "http"
    }

    async fn execute(&self, step: &StepInput, events: &mut Events) -> Result<Value, StepError> {
        let url = step
            .input
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| StepError::new("input.url (a string) is missing"))?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(StepError::new(format!(
                "input.url '{url}' must start with http:// or https://"
            )));
        }
        let parsed = reqwest::Url::parse(url)
            .map_err(|err| StepError::new(format!("input.url '{url}' is not a URL: {err}")))?;
        outbound::check_url(&self.policy, &parsed)
            .map_err(|err| StepError::outbound_refused(format!("POST {url}: {err}")))?;
        let client = self
            .client
            .as_ref()
            .map_err(|err| StepError::new(err.clone()))?;
        let timeout = step
            .input
            .get("timeout_ms")
            .and_then(Value::as_u64)
            .map_or(HTTP_DEFAULT_TIMEOUT, Duration::from_millis);
        let reply = client
            .post(parsed)
            .timeout(timeout)
            .json(step)
            .send()
            .await
            .map_err(|err| request_failed(url, &err))?;
        let status = reply.status().as_u16();
        let bytes = outbound::read_capped(reply, self.max_reply_bytes)
            .await
            .map_err(|err| match err {
                BodyError::TooLarge { size, cap } => StepError::output_too_large(format!(
                    "the reply of {url} has {size} bytes or more, over the cap of {cap} (RUNQ_MAX_OUTPUT_BYTES)"
                )),
                BodyError::Read(err) => {
                    StepError::new(format!("reading the reply of {url}: {err}"))
                }
            })?;
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        let output = json!({ "status": status, "body": body });
        events.record(
            "http.response",
            json!({ "url": url, "status": status, "body": output["body"] }),
        );
        if (200..300).contains(&status) {
            Ok(output)
        } else {
            Err(StepError::new(format!("POST {url} answered {status}")))
        }
    }
}

/// `sleep`: waits `input.ms` milliseconds.
pub struct Sleep;

#[async_trait]
impl Handler for Sleep {
    fn kind(&self) -> &str {
        "sleep"
    }

    async fn execute(&self, step: &StepInput, _events: &mut Events) -> Result<Value, StepError> {
        let ms = step
            .input
            .get("ms")
            .and_then(Value::as_u64)
            .ok_or_else(|| StepError::new("input.ms must be a non-negative integer"))?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(json!({ "slept_ms": ms }))
    }
}

/// `echo`: outputs its input merged over `prev` (when both are objects; else
/// the input alone).
pub struct Echo;

#[async_trait]
impl Handler for Echo {
    fn kind(&self) -> &str {
        "echo"
    }

    async fn execute(&self, step: &StepInput, _events: &mut Events) -> Result<Value, StepError> {
        Ok(match (&step.prev, &step.input) {
            (Value::Object(prev), Value::Object(input)) => {
                let mut merged: Map<String, Value> = prev.clone();
                merged.extend(input.iter().map(|(k, v)| (k.clone(), v.clone())));
                Value::Object(merged)
            }
            (Value::Object(prev), Value::Null) => Value::Object(prev.clone()),
            (_, input) => input.clone(),
        })
    }
}

/// `fail`: fails with `input.message` (for tests and demos).
pub struct Fail;

#[async_trait]
impl Handler for Fail {
    fn kind(&self) -> &str {
        "fail"
    }

    async fn execute(&self, step: &StepInput, _events: &mut Events) -> Result<Value, StepError> {
        let message = step
            .input
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("step failed");
        Err(StepError::new(message))
    }
}
