//! Where runs and steps are in their lives: the enums that mirror Postgres's.

use poem_openapi::Enum;
use serde::{Deserialize, Serialize};

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
