//! What the live event streams send (Server-Sent Events): a run's stream,
//! `GET /v1/runs/{id}/events/stream`, interleaves its state changes
//! ([`RunEvent`], the webhook body), its events ([`Event`], as
//! `GET /v1/runs/{id}/events` lists them) and the progress of its steps
//! ([`StepProgress`]); a tenant's stream, `GET /v1/events/stream`, sends
//! [`RunEvent`]s alone. Every `data` line is one of these types as JSON.

use chrono::{DateTime, Utc};
use poem_openapi::{Enum, Object, Union};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::*;

/// Version of [`StepProgress`]. A change a consumer could trip over gets a
/// new version; adding an optional field does not.
pub const STEP_PROGRESS_VERSION: i32 = 1;

/// The SSE `event` name of a run's [`Event`] on a run's stream.
pub const RUN_EVENT_ITEM: &str = "event";

/// Which step progress a [`StepProgress`] reports; also its SSE `event` name.
#[derive(Enum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepProgressType {
    /// The step began executing.
    #[serde(rename = "step.started")]
    #[oai(rename = "step.started")]
    Started,
    /// The step succeeded or failed.
    #[serde(rename = "step.finished")]
    #[oai(rename = "step.finished")]
    Finished,
}

impl StepProgressType {
    /// `step.started` or `step.finished`.
    pub fn as_str(self) -> &'static str {
        match self {
            StepProgressType::Started => "step.started",
            StepProgressType::Finished => "step.finished",
        }
    }
}

/// A step of a run started or finished: the `data` of `step.started` and
/// `step.finished` on a run's event stream.
///
/// Workers write a step's row when it finishes, not when it starts, so a
/// start is derived: the first unfinished step starts when a worker claims
/// the run (`run.started`), and step *p + 1* when step *p* succeeded while
/// the run kept running. On `step.started`, `started_at` is that moment (the
/// claim, or the previous step's checkpoint); on `step.finished` it is when
/// the worker itself began the step, by its own clock. A step can start and
/// never finish: the run's next state change (`run.retrying`,
/// `run.cancelled`, ...) says why.
///
/// Outputs are not carried: one can be as large as a run's result, every
/// watcher would receive it, and `GET /v1/runs/{id}` has it.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct StepProgress {
    /// The payload's version, 1.
    pub version: i32,
    /// `step.started` or `step.finished`.
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub progress_type: StepProgressType,
    /// Zero-based index in the pipeline.
    pub position: i32,
    /// Name given at creation.
    pub name: String,
    /// Handler kind.
    pub kind: String,
    /// The run attempt executing the step.
    pub attempt: i32,
    /// `pending` while the step executes (`step.started`), then `succeeded`
    /// or `failed`, as in `GET /v1/runs/{id}`.
    pub status: StepStatus,
    /// When the step started (see the type's description).
    pub started_at: DateTime<Utc>,
    /// When it finished (`step.finished` only).
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it failed (a failed `step.finished` only).
    #[serde(default)]
    pub error: Option<Value>,
}

/// One item of a run's event stream: a state change, a step's progress or
/// an event the run recorded. The SSE `event` name tells which (`run.*`,
/// `step.started` or `step.finished`, or `event`); `data` is the member's
/// JSON.
#[derive(Union, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum RunStreamItem {
    /// A state change (`run.started`, `run.succeeded`, ...), exactly as
    /// webhooks deliver it.
    StateChange(RunEvent),
    /// A step started or finished.
    Step(StepProgress),
    /// An event the run recorded.
    Event(Event),
}

impl RunStreamItem {
    /// The SSE `event` name: a state change's type (`run.succeeded`), a step
    /// progress's type (`step.started`), or [`RUN_EVENT_ITEM`].
    pub fn event_name(&self) -> &'static str {
        match self {
            RunStreamItem::StateChange(change) => change.event_type.as_str(),
            RunStreamItem::Step(progress) => progress.progress_type.as_str(),
            RunStreamItem::Event(_) => RUN_EVENT_ITEM,
        }
    }
}
