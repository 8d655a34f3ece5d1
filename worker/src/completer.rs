//! The completer: writes checkpoints and outcomes in batches.
//!
//! Executors hand their writes to one task that drains everything queued and
//! writes it with one statement per kind in one transaction, so the commit rate
//! of Postgres, not the number of runs, bounds throughput (DESIGN.md,
//! Performance). Batches form by themselves: while one flush is in flight the
//! next one queues up. Every write is fenced on the worker's lease.
//!
//! A crash before a flush loses no run: the lease expires and the rescuer
//! hands the run on.

use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};

use runq_shared::db::runs::{self, Backoff, Checkpoint, CheckpointResult, Completion, StepEvent};
use runq_shared::db::{is_unavailable, DbError};
use runq_shared::WorkerId;
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
    worker: WorkerId,
    leases: Leases,
    backoff: Backoff,
    max_batch: usize,
}

impl Completer {
    pub(crate) fn new(
        pool: PgPool,
        worker: WorkerId,
        leases: Leases,
        backoff: Backoff,
        max_batch: usize,
    ) -> Self {
        Self {
            pool,
            worker,
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
    ) -> (CompleterHandle, impl std::future::Future<Output = ()>) {
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
        let mut checkpoints = Vec::new();
        let mut checkpoint_events = Vec::new();
        let mut answers = Vec::new();
        let mut completions = Vec::new();
        let mut completion_events = Vec::new();
        for write in batch {
            match write {
                Write::Checkpoint {
                    checkpoint,
                    events,
                    answer,
                } => {
                    checkpoints.push(checkpoint);
                    checkpoint_events.extend(events);
                    answers.push(answer);
                }
                Write::Complete { completion, events } => {
                    completions.push(completion);
                    completion_events.extend(events);
                }
            }
        }
        let mut delay = Duration::from_millis(50);
        let results = loop {
            match self
                .write(
                    &checkpoints,
                    &checkpoint_events,
                    &completions,
                    &completion_events,
                )
                .await
            {
                Ok(results) => break Some(results),
                Err(err) if retryable(&err) && !abandon.is_cancelled() => {
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64,
                        runs = completions.len() + checkpoints.len(), "completer write failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = abandon.cancelled() => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(err) => {
                    // The leases expire and the rescuer hands these runs on.
                    tracing::error!(error = %err, runs = completions.len() + checkpoints.len(),
                        "completer gave up on a batch");
                    break None;
                }
            }
        };
        let checkpoint_results = results.as_ref().map(|(c, _)| c.as_slice()).unwrap_or(&[]);
        for (index, answer) in answers.into_iter().enumerate() {
            let result = checkpoint_results
                .get(index)
                .copied()
                .unwrap_or(CheckpointResult::LeaseLost);
            if result == CheckpointResult::LeaseLost {
                self.leases.remove(checkpoints[index].lease);
            }
            // The executor may have been cancelled meanwhile; nobody to tell.
            let _ = answer.send(result);
        }
        if let Some((_, written)) = &results {
            if written.len() < completions.len() {
                tracing::warn!(
                    refused = completions.len() - written.len(),
                    "lease lost: completions refused, their runs belong to another worker now"
                );
            }
        }
        for completion in &completions {
            self.leases.remove(completion.lease);
        }
    }

    async fn write(
        &self,
        checkpoints: &[Checkpoint],
        checkpoint_events: &[StepEvent],
        completions: &[Completion],
        completion_events: &[StepEvent],
    ) -> Result<(Vec<CheckpointResult>, Vec<runq_shared::RunId>), DbError> {
        // One statement needs no explicit transaction: it commits alone, in one
        // round trip. Both kinds at once share one transaction (one commit).
        if checkpoints.is_empty() || completions.is_empty() {
            let mut conn = self.pool.acquire().await?;
            let checkpointed = if checkpoints.is_empty() {
                Vec::new()
            } else {
                runs::checkpoint_many(&mut conn, self.worker, checkpoints, checkpoint_events)
                    .await?
            };
            let completed = if completions.is_empty() {
                Vec::new()
            } else {
                runs::complete_many(
                    &mut conn,
                    self.worker,
                    completions,
                    completion_events,
                    self.backoff,
                )
                .await?
            };
            return Ok((checkpointed, completed));
        }
        let mut tx = self.pool.begin().await?;
        let checkpointed =
            runs::checkpoint_many(&mut tx, self.worker, checkpoints, checkpoint_events).await?;
        let completed = runs::complete_many(
            &mut tx,
            self.worker,
            completions,
            completion_events,
            self.backoff,
        )
        .await?;
        tx.commit().await?;
        Ok((checkpointed, completed))
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
