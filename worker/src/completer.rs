//! The completer: writes checkpoints and outcomes in batches.
//!
//! Executors hand their writes to one task that drains everything queued and
//! writes it with one statement per kind in one transaction, so the commit rate
//! of Postgres, not the number of runs, bounds throughput (DESIGN.md,
//! Performance). Batches form by themselves: while one flush is in flight the
//! next one queues up. Every write is fenced on its lease token.
//!
//! A batch the database refuses for a reason other than being unreachable
//! (bad data that slipped past the executor's checks, a constraint) is split
//! in halves and each half written again, down to the one write that fails;
//! that run's attempt is recorded as failed with the database's reason
//! (`write_refused`) and every other run of the batch commits (invariant 7).
//! A crash before a flush loses no run: the lease expires and the rescuer
//! hands the run on.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use runq_shared::db::runs;
use runq_shared::db::{is_unavailable, DbError};
use runq_shared::protocol::{
    Backoff, Checkpoint, CheckpointResult, Completion, FailedStep, Outcome, StepEvent,
};
use runq_shared::{ErrorReason, RunError, RunId};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::leases::Leases;

/// One write an executor asks for.
#[derive(Debug)]
pub(crate) enum Write {
    /// A non-final step finished; the executor waits for the answer before
    /// starting the next step.
    Checkpoint {
        checkpoint: Checkpoint,
        events: Vec<StepEvent>,
        answer: oneshot::Sender<CheckpointResult>,
    },
    /// An attempt ended.
    Complete {
        completion: Completion,
        events: Vec<StepEvent>,
    },
}

/// What became of one write.
#[derive(Debug, Clone)]
enum Written {
    Checkpoint(CheckpointResult),
    /// `true`: written; `false`: the lease was gone and nothing was written.
    Completed(bool),
}

/// Sends writes to the completer.
#[derive(Clone)]
pub(crate) struct CompleterHandle(mpsc::Sender<Write>);

impl CompleterHandle {
    /// Queues `write`. Waits only when the queue is full (backpressure).
    pub(crate) async fn send(&self, write: Write) -> bool {
        self.0.send(write).await.is_ok()
    }
}

pub(crate) struct Completer {
    pool: PgPool,
    leases: Leases,
    backoff: Backoff,
    max_batch: usize,
}

type Persisting<'a> = Pin<Box<dyn Future<Output = Vec<Option<Written>>> + Send + 'a>>;

impl Completer {
    pub(crate) fn new(pool: PgPool, leases: Leases, backoff: Backoff, max_batch: usize) -> Self {
        Self {
            pool,
            leases,
            backoff,
            max_batch: max_batch.max(1),
        }
    }

    /// The channel executors write to, and the future that drains it. The
    /// future ends once every sender is dropped and the queue is flushed, or
    /// when `abandon` fires while the database stays unreachable.
    pub(crate) fn start(
        self,
        abandon: CancellationToken,
    ) -> (CompleterHandle, impl Future<Output = ()>) {
        let (tx, rx) = mpsc::channel(self.max_batch * 4);
        (CompleterHandle(tx), self.run(rx, abandon))
    }

    async fn run(self, mut rx: mpsc::Receiver<Write>, abandon: CancellationToken) {
        // Flushes in flight at once: while one commits, the next batch is
        // written on a second connection. Safe because a run's writes never
        // share a flush window: an executor waits for its checkpoint's answer
        // before it sends anything else about that run.
        const IN_FLIGHT: usize = 2;
        let mut flushing = FuturesUnordered::new();
        let mut open = true;
        while open || !flushing.is_empty() {
            let mut batch = Vec::with_capacity(self.max_batch);
            tokio::select! {
                received = rx.recv_many(&mut batch, self.max_batch),
                    if open && flushing.len() < IN_FLIGHT =>
                {
                    if received == 0 {
                        open = false;
                    } else {
                        flushing.push(self.flush(batch, &abandon));
                    }
                }
                Some(()) = flushing.next(), if !flushing.is_empty() => {}
            }
        }
    }

    async fn flush(&self, batch: Vec<Write>, abandon: &CancellationToken) {
        let results = self.persist(&batch, abandon).await;
        let mut refused = 0;
        for (write, result) in batch.into_iter().zip(results) {
            match write {
                Write::Checkpoint {
                    checkpoint, answer, ..
                } => {
                    let result = match result {
                        Some(Written::Checkpoint(result)) => result,
                        _ => CheckpointResult::LeaseLost,
                    };
                    if result == CheckpointResult::LeaseLost {
                        self.leases.remove(checkpoint.lease);
                    }
                    // The executor may have been cancelled meanwhile; nobody to tell.
                    let _ = answer.send(result);
                }
                Write::Complete { completion, .. } => {
                    if matches!(result, Some(Written::Completed(false))) {
                        refused += 1;
                    }
                    // Written, refused or given up: either way this worker is
                    // done with the run (a given-up run's lease expires and
                    // the rescuer hands it on).
                    self.leases.remove(completion.lease);
                }
            }
        }
        if refused > 0 {
            tracing::warn!(
                refused,
                "lease lost: completions refused, their runs belong to another worker now"
            );
        }
    }

    /// Writes `writes`, splitting the batch around writes the database
    /// refuses. One result per write, in order; `None`: given up while the
    /// database stayed unreachable.
    fn persist<'a>(
        &'a self,
        writes: &'a [Write],
        abandon: &'a CancellationToken,
    ) -> Persisting<'a> {
        Box::pin(async move {
            let err = match self.write_retrying(writes, abandon).await {
                Ok(results) => return results.into_iter().map(Some).collect(),
                Err(err) => err,
            };
            if retryable(&err) {
                tracing::error!(error = %err, runs = writes.len(),
                    "completer gave up on a batch: the database stayed unreachable");
                return vec![None; writes.len()];
            }
            if writes.len() > 1 {
                tracing::warn!(error = %err, runs = writes.len(),
                    "the database refused a batch; splitting it to find the bad write");
                let (left, right) = writes.split_at(writes.len() / 2);
                let mut results = self.persist(left, abandon).await;
                results.extend(self.persist(right, abandon).await);
                return results;
            }
            vec![self.refuse(&writes[0], &err, abandon).await]
        })
    }

    /// Records that the database refused `write` alone: a checkpoint is
    /// answered `Refused` (its executor fails the attempt), a completion is
    /// replaced by a failed attempt carrying the database's reason.
    async fn refuse(
        &self,
        write: &Write,
        err: &DbError,
        abandon: &CancellationToken,
    ) -> Option<Written> {
        let reason = err.to_string();
        let (lease, step) = match write {
            Write::Checkpoint { checkpoint, .. } => {
                tracing::error!(run.id = %checkpoint.lease.id, error = %reason,
                    "the database refused a checkpoint");
                return Some(Written::Checkpoint(CheckpointResult::Refused(reason)));
            }
            Write::Complete { completion, .. } => {
                let step = match &completion.outcome {
                    Outcome::Succeeded {
                        position,
                        started_at,
                        ..
                    } => Some(FailedStep {
                        position: *position,
                        started_at: *started_at,
                    }),
                    Outcome::Failed { step, .. } => step.clone(),
                    Outcome::Stopped { .. } | Outcome::Cancelled => None,
                };
                (completion.lease, step)
            }
        };
        tracing::error!(run.id = %lease.id, error = %reason,
            "the database refused an outcome; recording the attempt as failed");
        let position = step.as_ref().map(|s| s.position);
        let replacement = Write::Complete {
            completion: Completion {
                lease,
                outcome: Outcome::Failed {
                    step,
                    error: RunError::new(
                        ErrorReason::WriteRefused,
                        format!("the database refused this attempt's outcome: {reason}"),
                        position,
                    ),
                },
            },
            events: Vec::new(),
        };
        match self
            .write_retrying(std::slice::from_ref(&replacement), abandon)
            .await
        {
            Ok(mut results) => results.pop(),
            Err(err) => {
                tracing::error!(run.id = %lease.id, error = %err,
                    "could not record the refused outcome; the lease will expire");
                None
            }
        }
    }

    /// Writes `writes` in one transaction, retrying while the database is
    /// unreachable (until `abandon`) or the transaction lost a deadlock.
    async fn write_retrying(
        &self,
        writes: &[Write],
        abandon: &CancellationToken,
    ) -> Result<Vec<Written>, DbError> {
        let mut delay = Duration::from_millis(50);
        loop {
            match self.write(writes).await {
                Ok(results) => return Ok(results),
                Err(err) if retryable(&err) && !abandon.is_cancelled() => {
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64,
                        runs = writes.len(), "completer write failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = abandon.cancelled() => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn write(&self, writes: &[Write]) -> Result<Vec<Written>, DbError> {
        // Borrowed, not cloned: a bisected batch is written again from the
        // same writes.
        let mut checkpoints = Vec::new();
        let mut checkpoint_events = Vec::new();
        let mut completions = Vec::new();
        let mut completion_events = Vec::new();
        for write in writes {
            match write {
                Write::Checkpoint {
                    checkpoint, events, ..
                } => {
                    checkpoints.push(checkpoint);
                    checkpoint_events.extend(events);
                }
                Write::Complete { completion, events } => {
                    completions.push(completion);
                    completion_events.extend(events);
                }
            }
        }
        // One statement needs no explicit transaction: it commits alone, in one
        // round trip. Both kinds at once share one transaction (one commit).
        let (checkpointed, completed) = if checkpoints.is_empty() || completions.is_empty() {
            let mut conn = self.pool.acquire().await?;
            let checkpointed = if checkpoints.is_empty() {
                Vec::new()
            } else {
                runs::checkpoint_many(&mut conn, &checkpoints, &checkpoint_events).await?
            };
            let completed = if completions.is_empty() {
                Vec::new()
            } else {
                runs::complete_many(&mut conn, &completions, &completion_events, self.backoff)
                    .await?
            };
            (checkpointed, completed)
        } else {
            let mut tx = self.pool.begin().await?;
            let checkpointed =
                runs::checkpoint_many(&mut tx, &checkpoints, &checkpoint_events).await?;
            let completed =
                runs::complete_many(&mut tx, &completions, &completion_events, self.backoff)
                    .await?;
            tx.commit().await?;
            (checkpointed, completed)
        };
        let completed: std::collections::HashSet<RunId> = completed.into_iter().collect();
        let mut checkpointed = checkpointed.into_iter();
        Ok(writes
            .iter()
            .map(|write| match write {
                Write::Checkpoint { .. } => {
                    Written::Checkpoint(checkpointed.next().unwrap_or(CheckpointResult::LeaseLost))
                }
                Write::Complete { completion, .. } => {
                    Written::Completed(completed.contains(&completion.lease.id))
                }
            })
            .collect())
    }
}

/// Errors worth retrying the same batch for: the database is away, or the
/// transaction lost a deadlock or serialization race.
fn retryable(err: &DbError) -> bool {
    match err {
        DbError::Sqlx(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("40001" | "40P01")) || err.is_unavailable()
        }
        DbError::Sqlx(sqlx_err) => is_unavailable(sqlx_err),
        _ => false,
    }
}
