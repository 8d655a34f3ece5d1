//! The worker protocol: what a worker receives when it claims a run and what it
//! hands back (checkpoints, outcomes, events), independent of how the database
//! layer stores them. [`crate::db::runs`] turns these into fenced statements.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use crate::model::{NewEvent, RunError, RunId, StepStatus, TenantId};

/// One lease on one run: the fence on every write a worker makes about it.
///
/// `token` is the run's `lease_token` as the claim left it. Tokens only grow
/// over a run's whole life (each claim and each move out of `running` takes a
/// new one; a retry never resets it), so `(id, token)` matches the run only
/// while this lease is its current one (DESIGN.md, invariant 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The run.
    pub id: RunId,
    /// The run's lease token under this lease.
    pub token: i64,
    /// The attempt the claim started (what users see; not part of the fence).
    pub attempt: i32,
}

/// A step as a worker receives it with a claimed run.
#[derive(Debug, Clone, Deserialize)]
pub struct ClaimedStep {
    /// Zero-based index.
    pub position: i32,
    /// Name.
    pub name: String,
    /// Handler kind.
    pub kind: String,
    /// Handler input.
    pub input: Value,
    /// Seconds the step may take.
    pub timeout_seconds: Option<i32>,
    /// `succeeded` for steps an earlier attempt finished (their output is kept).
    pub status: StepStatus,
    /// Output of an earlier attempt.
    pub output: Option<Value>,
}

/// A run a worker claimed: everything it needs to execute it.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    /// The lease the claim took.
    pub lease: Lease,
    /// Owner.
    pub tenant_id: TenantId,
    /// Queue.
    pub queue: String,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Seconds the run may take.
    pub timeout_seconds: Option<i32>,
    /// Metadata handed to each step.
    pub metadata: Value,
    /// When this attempt was claimed (database clock).
    pub started_at: DateTime<Utc>,
    /// The pipeline, in order, with earlier checkpoints.
    pub steps: Vec<ClaimedStep>,
    /// The run's project, handed to each step.
    pub project: Option<crate::tenancy::StepProject>,
    /// Most events the run may record over all its attempts (the tenant's
    /// `run_events` quota); past it the run is stopped (`event_cap`).
    pub event_cap: Option<i64>,
    /// Most seconds the run may execute by its tenant's quota
    /// (`run_duration_minutes`); the worker also applies the run's own
    /// timeout and its server's cap, whichever is shortest.
    pub duration_cap_seconds: Option<i64>,
    /// Events earlier attempts recorded (counted only when `event_cap` may
    /// apply; else 0).
    pub events_recorded: i64,
}

impl ClaimedRun {
    /// The run's id.
    pub fn id(&self) -> RunId {
        self.lease.id
    }
}

/// An event recorded by a step, written with its checkpoint or completion.
#[derive(Debug, Clone)]
pub struct StepEvent {
    /// The lease under which it was recorded.
    pub lease: Lease,
    /// The step that recorded it.
    pub position: i32,
    /// The event.
    pub event: NewEvent,
}

/// A non-final step finished: its output is stored before the next step starts.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The lease.
    pub lease: Lease,
    /// The finished step.
    pub position: i32,
    /// Its output.
    pub output: Value,
    /// When it started (worker clock; display only).
    pub started_at: DateTime<Utc>,
}

/// What became of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointResult {
    /// Stored; the run may go on.
    Stored {
        /// A client asked to cancel the run: stop before the next step.
        cancel_requested: bool,
    },
    /// The lease is gone; nothing was written and the worker must drop the run.
    LeaseLost,
    /// The database refused this checkpoint alone (the reason is its message):
    /// the worker fails the attempt without it.
    Refused(String),
}

/// How a step ended inside a failed attempt.
#[derive(Debug, Clone)]
pub struct FailedStep {
    /// The step.
    pub position: i32,
    /// When it started (worker clock).
    pub started_at: DateTime<Utc>,
}

/// How an attempt ended, as the completer writes it.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Every step succeeded; `output` is the last step's and becomes the result.
    Succeeded {
        /// The last step.
        position: i32,
        /// Its output.
        output: Value,
        /// When it started.
        started_at: DateTime<Utc>,
    },
    /// The attempt failed: retried after a backoff while attempts remain,
    /// else the run fails.
    Failed {
        /// The step that failed, when one did (an executor crash names none).
        step: Option<FailedStep>,
        /// Why.
        error: RunError,
    },
    /// The run exceeded a cap (`error.reason` says which).
    Stopped {
        /// Why.
        error: RunError,
    },
    /// A client cancelled the run.
    Cancelled,
}

/// One finished attempt.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The lease.
    pub lease: Lease,
    /// How it ended.
    pub outcome: Outcome,
}

/// Retry backoff: `base_ms * 2^(attempt-1)` capped at `max_ms`, with up to
/// 20 % jitter (the SQL function `runq_backoff`, used by every path that
/// retries a run).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay after the first failed attempt, in milliseconds.
    pub base_ms: f64,
    /// Longest delay, in milliseconds.
    pub max_ms: f64,
}

/// A held run as a heartbeat found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldRun {
    /// The run.
    pub id: RunId,
    /// A client asked to cancel it.
    pub cancel_requested: bool,
    /// Whether this heartbeat extended the lease (`false`: the row was locked
    /// by the worker's own completer, which is about to finish it).
    pub extended: bool,
}
