//! Executes one claimed run: its steps in order from the first unfinished one,
//! each step's output checkpointed before the next starts (DESIGN.md,
//! invariant 5), the outcome handed to the completer.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use std::time::Duration;

use chrono::Utc;
use runq_shared::db::runs::{
    Checkpoint, CheckpointResult, ClaimedRun, Completion, Lease, Outcome, StepEvent,
};
use runq_shared::{ErrorReason, RunError, StepInput, StepStatus};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::completer::{CompleterHandle, Write};
use crate::handler::{Events, Handlers};
use crate::leases::Signals;

/// What the executor needs besides the run.
pub(crate) struct Context {
    pub(crate) handlers: Handlers,
    pub(crate) completer: CompleterHandle,
    /// Fires when the shutdown grace period is over: stop and hand back.
    pub(crate) hard_stop: CancellationToken,
    /// The server's cap on any run's duration.
    pub(crate) max_run_duration: Duration,
}

/// How long `run` may take: its own timeout, capped by the server's limit.
pub(crate) fn duration_limit(run: &ClaimedRun, cap: Duration) -> Duration {
    match run.timeout_seconds {
        Some(seconds) if seconds > 0 => cap.min(Duration::from_secs(seconds as u64)),
        _ => cap,
    }
}

/// How an executor task ended.
#[derive(Debug)]
pub(crate) enum TaskEnd {
    /// The outcome went to the completer.
    Handed,
    /// The lease was lost; nothing more was written.
    Dropped(Lease),
    /// Shutdown interrupted it: the caller hands the run back to pending.
    Interrupted(Lease),
}

/// Runs `run` to its outcome unless the lease is lost, the run is cancelled or
/// shutdown interrupts it.
///
/// `deadline` is when the run's duration cap runs out, on this process's
/// monotonic clock (measured from the claim, so wall-clock skew cannot move it).
pub(crate) async fn execute(
    run: ClaimedRun,
    deadline: tokio::time::Instant,
    signals: Signals,
    context: Arc<Context>,
) -> TaskEnd {
    let lease = Lease {
        id: run.id,
        attempt: run.attempt,
    };
    let span =
        tracing::info_span!("run", run.id = %run.id, run.attempt = run.attempt, queue = %run.queue);
    async move {
        let mut events = Vec::new();
        // Biased: a lost lease or shutdown wins over an outcome ready at the same
        // instant, so nothing is written for a run we no longer own.
        let outcome = tokio::select! {
            biased;
            _ = signals.lost.cancelled() => return TaskEnd::Dropped(lease),
            _ = context.hard_stop.cancelled() => return TaskEnd::Interrupted(lease),
            _ = signals.cancel.cancelled() => Outcome::Cancelled,
            // Dropped with the select when the run ends first: no timer outlives it.
            _ = tokio::time::sleep_until(deadline) => Outcome::Stopped {
                error: RunError {
                    reason: ErrorReason::DurationCap,
                    message: format!(
                        "the run exceeded its duration cap of {} s",
                        duration_limit(&run, context.max_run_duration).as_secs_f64()
                    ),
                    position: None,
                },
            },
            outcome = pipeline(&run, lease, &context, &mut events) => match outcome {
                Some(outcome) => outcome,
                None => return TaskEnd::Dropped(lease),
            },
        };
        let completion = Completion { lease, outcome };
        if context
            .completer
            .send(Write::Complete { completion, events })
            .await
        {
            TaskEnd::Handed
        } else {
            TaskEnd::Dropped(lease)
        }
    }
    .instrument(span)
    .await
}

/// Executes the unfinished steps. `None`: a checkpoint found the lease gone.
///
/// # Cancel safety
///
/// Dropping it mid-step aborts the step's handler; checkpoints already queued
/// are still written (fenced), so a later attempt resumes after them.
async fn pipeline(
    run: &ClaimedRun,
    lease: Lease,
    context: &Context,
    final_events: &mut Vec<StepEvent>,
) -> Option<Outcome> {
    let first = run
        .steps
        .iter()
        .position(|s| s.status != StepStatus::Succeeded);
    let mut results: Vec<Value> = run
        .steps
        .iter()
        .take(first.unwrap_or(run.steps.len()))
        .map(|s| s.output.clone().unwrap_or(Value::Null))
        .collect();
    let Some(first) = first else {
        // Every step finished on an earlier attempt; only the completion was lost.
        let last = run.steps.len().saturating_sub(1) as i32;
        return Some(Outcome::Succeeded {
            position: last,
            output: results.pop().unwrap_or(Value::Null),
            started_at: Utc::now(),
        });
    };
    let last = run.steps.len() - 1;
    for (index, step) in run.steps.iter().enumerate().skip(first) {
        let position = index as i32;
        let started_at = Utc::now();
        let input = StepInput {
            id: run.id,
            attempt: run.attempt,
            position,
            name: step.name.clone(),
            input: step.input.clone(),
            prev: results.last().cloned().unwrap_or(Value::Null),
            results: results.clone(),
            metadata: run.metadata.clone(),
        };
        let mut events = Events::default();
        let result = match context.handlers.get(&step.kind) {
            None => Err(RunError {
                reason: ErrorReason::UnknownStepKind,
                message: format!("no handler registered for step kind '{}'", step.kind),
                position: Some(position),
            }),
            Some(handler) => {
                let failed = |err: crate::handler::StepError| RunError {
                    reason: ErrorReason::StepFailed,
                    message: err.message,
                    position: Some(position),
                };
                // A panicking handler fails its step instead of taking the
                // executor (and the run's lease bookkeeping) down with it.
                let work = AssertUnwindSafe(handler.execute(&input, &mut events))
                    .catch_unwind()
                    .map(|result| {
                        result.unwrap_or_else(|_| {
                            Err(crate::handler::StepError::new(format!(
                                "the '{}' handler panicked",
                                step.kind
                            )))
                        })
                    });
                match step.timeout_seconds {
                    Some(seconds) => {
                        let limit = Duration::from_secs(seconds.max(1) as u64);
                        match tokio::time::timeout(limit, work).await {
                            Ok(result) => result.map_err(failed),
                            Err(_) => Err(RunError {
                                reason: ErrorReason::StepTimeout,
                                message: format!("step timed out after {seconds} s"),
                                position: Some(position),
                            }),
                        }
                    }
                    None => work.await.map_err(failed),
                }
            }
        };
        let step_events = events.0.into_iter().map(|event| StepEvent {
            lease,
            position,
            event,
        });
        match result {
            Err(error) => {
                tracing::debug!(position, error = %error.message, "step failed");
                final_events.extend(step_events);
                return Some(Outcome::StepFailed {
                    position,
                    error,
                    started_at,
                    max_attempts: run.max_attempts,
                });
            }
            Ok(output) if index == last => {
                final_events.extend(step_events);
                return Some(Outcome::Succeeded {
                    position,
                    output,
                    started_at,
                });
            }
            Ok(output) => {
                let (answer, answered) = oneshot::channel();
                let checkpoint = Checkpoint {
                    lease,
                    position,
                    output: output.clone(),
                    started_at,
                };
                let write = Write::Checkpoint {
                    checkpoint,
                    events: step_events.collect(),
                    answer,
                };
                if !context.completer.send(write).await {
                    return None;
                }
                match answered.await.unwrap_or(CheckpointResult::LeaseLost) {
                    CheckpointResult::LeaseLost => {
                        tracing::warn!(
                            position,
                            "lease lost: checkpoint refused, dropping the run"
                        );
                        return None;
                    }
                    CheckpointResult::Stored {
                        cancel_requested: true,
                    } => return Some(Outcome::Cancelled),
                    CheckpointResult::Stored {
                        cancel_requested: false,
                    } => results.push(output),
                }
            }
        }
    }
    None
}
