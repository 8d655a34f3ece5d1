//! Executes one claimed run: its steps in order from the first unfinished one,
//! each step's output checkpointed before the next starts (DESIGN.md,
//! invariant 5), the outcome handed to the completer.
//!
//! Whatever a handler produces is vetted before it joins a shared batch
//! (invariant 7): an output or event Postgres cannot store, or one past the
//! size cap, fails that step with a reason naming the problem, and never
//! reaches the completer. A panic anywhere in the executor fails the attempt
//! at once instead of leaving the run held until the process exits.

use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::FutureExt;
use runq_shared::protocol::{
    Checkpoint, CheckpointResult, ClaimedRun, Completion, FailedStep, Lease, Outcome, StepEvent,
};
use runq_shared::{storable, ErrorReason, NewEvent, RunError, StepInput, StepStatus};
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
    /// Most bytes a step's output, or its events together, may take.
    pub(crate) max_output_bytes: usize,
}

/// How long `run` may execute: the shortest of its own timeout, its
/// tenant's `run_duration_minutes` quota and the server's limit.
fn duration_limit(run: &ClaimedRun, cap: Duration) -> Duration {
    let cap = match run.duration_cap_seconds {
        Some(seconds) if seconds > 0 => cap.min(Duration::from_secs(seconds as u64)),
        _ => cap,
    };
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

/// Runs `run` as [`execute`] does, and turns a panic of the executor itself
/// (handler panics are caught per step) into a failed attempt written right
/// away, so the run is neither held until the process exits nor left to
/// wait for its lease to expire.
pub(crate) async fn execute_guarded(
    run: ClaimedRun,
    signals: Signals,
    context: Arc<Context>,
) -> TaskEnd {
    let lease = run.lease;
    let completer = context.completer.clone();
    match AssertUnwindSafe(execute(run, signals, context))
        .catch_unwind()
        .await
    {
        Ok(end) => end,
        Err(panic) => {
            let message = panic_message(panic.as_ref());
            tracing::error!(run.id = %lease.id, error = %message, "executor panicked; failing the attempt");
            let completion = Completion {
                lease,
                outcome: Outcome::Failed {
                    step: None,
                    error: RunError::new(
                        ErrorReason::ExecutorPanicked,
                        format!("the worker's executor panicked: {message}"),
                        None,
                    ),
                },
            };
            let write = Write::Complete {
                completion,
                events: Vec::new(),
            };
            if completer.send(write).await {
                TaskEnd::Handed
            } else {
                TaskEnd::Dropped(lease)
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// Runs `run` to its outcome unless the lease is lost, the run is cancelled or
/// shutdown interrupts it.
///
/// The duration cap starts now, when execution starts, on this process's
/// monotonic clock: time the run spent claimed in the prefetch buffer does not
/// count (invariant 8), and wall-clock skew cannot move it.
async fn execute(run: ClaimedRun, signals: Signals, context: Arc<Context>) -> TaskEnd {
    let lease = run.lease;
    let limit = duration_limit(&run, context.max_run_duration);
    let deadline = tokio::time::Instant::now() + limit;
    let span = tracing::info_span!("run", run.id = %lease.id, run.attempt = lease.attempt,
        queue = %run.queue);
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
                error: RunError::new(
                    ErrorReason::DurationCap,
                    format!("the run exceeded its duration cap of {} s", limit.as_secs_f64()),
                    None,
                ),
            },
            outcome = pipeline(&run, &context, &mut events) => match outcome {
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
    context: &Context,
    final_events: &mut Vec<StepEvent>,
) -> Option<Outcome> {
    let lease = run.lease;
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
    // Events of this run so far, earlier attempts included (the claim counts
    // them when a cap applies).
    let mut recorded = run.events_recorded;
    for (index, step) in run.steps.iter().enumerate().skip(first) {
        let position = index as i32;
        let started_at = Utc::now();
        let input = StepInput {
            id: lease.id,
            attempt: lease.attempt,
            position,
            name: step.name.clone(),
            input: step.input.clone(),
            prev: results.last().cloned().unwrap_or(Value::Null),
            results: results.clone(),
            metadata: run.metadata.clone(),
            project: run.project.clone(),
        };
        let mut events = Events::default();
        let result = run_step(
            context,
            &step.kind,
            step.timeout_seconds,
            &input,
            &mut events,
        )
        .await
        .and_then(|output| vet(&output, &events.0, context.max_output_bytes).map(|()| output))
        .map_err(|mut error| {
            error.position = Some(position);
            error
        });
        let failed = |error: RunError| {
            tracing::warn!(position, step = %step.name, kind = %step.kind,
                reason = ?error.reason, error = %error.message, "step failed");
            Some(Outcome::Failed {
                step: Some(FailedStep {
                    position,
                    started_at,
                }),
                error,
            })
        };
        if let Err(error) = &result {
            // Events of a step whose output cannot be stored are dropped with
            // it: they may be what cannot be stored.
            if is_vetting(error) {
                return failed(error.clone());
            }
        }
        if let Some(cap) = run.event_cap {
            let total = recorded.saturating_add(events.0.len() as i64);
            if total > cap {
                // The events up to the cap are kept; the step's output is
                // not, and the run stops here whatever the step returned.
                let keep = usize::try_from(cap.saturating_sub(recorded)).unwrap_or(0);
                events.0.truncate(keep);
                final_events.extend(step_events(lease, position, events));
                tracing::warn!(position, cap, "event cap reached; stopping the run");
                return Some(Outcome::Stopped {
                    error: RunError::new(
                        ErrorReason::EventCap,
                        format!(
                            "the run recorded more than its cap of {cap} events \
                             (quota run_events)"
                        ),
                        Some(position),
                    ),
                });
            }
            recorded = total;
        }
        let output = match result {
            Err(error) => {
                final_events.extend(step_events(lease, position, events));
                return failed(error);
            }
            Ok(output) => output,
        };
        if index == last {
            final_events.extend(step_events(lease, position, events));
            return Some(Outcome::Succeeded {
                position,
                output,
                started_at,
            });
        }
        let (answer, answered) = oneshot::channel();
        let write = Write::Checkpoint {
            checkpoint: Checkpoint {
                lease,
                position,
                output: output.clone(),
                started_at,
            },
            events: step_events(lease, position, events),
            answer,
        };
        if !context.completer.send(write).await {
            return None;
        }
        match answered.await.unwrap_or(CheckpointResult::LeaseLost) {
            CheckpointResult::LeaseLost => {
                tracing::warn!(position, "lease lost: checkpoint refused, dropping the run");
                return None;
            }
            CheckpointResult::Refused(reason) => {
                return failed(RunError::new(
                    ErrorReason::WriteRefused,
                    format!("the database refused this step's checkpoint: {reason}"),
                    Some(position),
                ));
            }
            CheckpointResult::Stored {
                cancel_requested: true,
            } => return Some(Outcome::Cancelled),
            CheckpointResult::Stored {
                cancel_requested: false,
            } => results.push(output),
        }
    }
    None
}

fn step_events(lease: Lease, position: i32, events: Events) -> Vec<StepEvent> {
    events
        .0
        .into_iter()
        .map(|event| StepEvent {
            lease,
            position,
            event,
        })
        .collect()
}

/// Runs one step's handler with its timeout; a panicking handler fails its
/// step instead of taking the executor (and the run's lease bookkeeping) down.
async fn run_step(
    context: &Context,
    kind: &str,
    timeout_seconds: Option<i32>,
    input: &StepInput,
    events: &mut Events,
) -> Result<Value, RunError> {
    let Some(handler) = context.handlers.get(kind) else {
        return Err(RunError::new(
            ErrorReason::UnknownStepKind,
            format!("no handler registered for step kind '{kind}'"),
            None,
        ));
    };
    let work = AssertUnwindSafe(handler.execute(input, events))
        .catch_unwind()
        .map(|result| match result {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(err)) => Err(RunError::new(err.reason(), err.message, None)),
            Err(panic) => Err(RunError::new(
                ErrorReason::StepFailed,
                format!(
                    "the '{kind}' handler panicked: {}",
                    panic_message(panic.as_ref())
                ),
                None,
            )),
        });
    match timeout_seconds {
        Some(seconds) => {
            let limit = Duration::from_secs(seconds.max(1) as u64);
            tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
                Err(RunError::new(
                    ErrorReason::StepTimeout,
                    format!("step timed out after {seconds} s"),
                    None,
                ))
            })
        }
        None => work.await,
    }
}

fn is_vetting(error: &RunError) -> bool {
    matches!(
        error.reason,
        ErrorReason::OutputUnstorable | ErrorReason::OutputTooLarge
    )
}

/// Refuses an output or events Postgres cannot store or that exceed `max_bytes`.
fn vet(output: &Value, events: &[NewEvent], max_bytes: usize) -> Result<(), RunError> {
    let unstorable = |err: storable::Unstorable| {
        RunError::new(ErrorReason::OutputUnstorable, err.to_string(), None)
    };
    storable::check("output", output).map_err(unstorable)?;
    let size = json_size(output);
    if size > max_bytes {
        return Err(RunError::new(
            ErrorReason::OutputTooLarge,
            format!("the step's output takes {size} bytes, more than the cap of {max_bytes} (RUNQ_MAX_OUTPUT_BYTES)"),
            None,
        ));
    }
    let mut total = 0;
    for (index, event) in events.iter().enumerate() {
        storable::check_text(&format!("events[{index}].kind"), &event.kind).map_err(unstorable)?;
        storable::check(&format!("events[{index}].data"), &event.data).map_err(unstorable)?;
        total += json_size(&event.data);
    }
    if total > max_bytes {
        return Err(RunError::new(
            ErrorReason::OutputTooLarge,
            format!("the step's {} events take {total} bytes, more than the cap of {max_bytes} (RUNQ_MAX_OUTPUT_BYTES)", events.len()),
            None,
        ));
    }
    Ok(())
}

/// Bytes `value` takes as JSON, counted without building the text.
fn json_size(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a Value to a sink that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    let _ = count.flush();
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use runq_shared::protocol::ClaimedRun;

    fn run(timeout_seconds: Option<i32>, duration_cap_seconds: Option<i64>) -> ClaimedRun {
        ClaimedRun {
            lease: Lease {
                id: uuid::Uuid::now_v7(),
                token: 1,
                attempt: 1,
            },
            tenant_id: uuid::Uuid::now_v7(),
            queue: "default".to_owned(),
            max_attempts: 1,
            timeout_seconds,
            metadata: Value::Null,
            started_at: Utc::now(),
            steps: Vec::new(),
            event_cap: None,
            duration_cap_seconds,
            events_recorded: 0,
            project: None,
        }
    }

    /// The duration cap is the shortest of the run's timeout, the tenant's
    /// `run_duration_minutes` and the server's cap.
    #[test]
    fn duration_limit_is_the_shortest_cap() {
        let server = Duration::from_secs(900);
        let limit = |timeout, tenant| duration_limit(&run(timeout, tenant), server).as_secs();
        assert_eq!(limit(None, None), 900);
        assert_eq!(limit(None, Some(60)), 60);
        assert_eq!(limit(Some(30), Some(60)), 30);
        assert_eq!(limit(Some(120), Some(60)), 60);
        assert_eq!(limit(Some(2_000), Some(3_600)), 900);
    }
}
