//! The claim loop: claims runs in batches up to the worker's capacity,
//! starts them as slots free up, and records how each executor ended.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use runq_shared::db::runs;
use runq_shared::db::DbError;
use runq_shared::protocol::{ClaimedRun, Lease};
use runq_shared::WorkerId;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::executor::{self, Context, TaskEnd};
use crate::leases::Leases;
use crate::services::retry_delay;
use crate::worker::{Worker, WorkerReport};

/// A claim in flight: the runs, and the instant the statement was sent.
pub(crate) type ClaimFuture =
    Pin<Box<dyn Future<Output = Result<(runs::Claimed, Instant), DbError>> + Send>>;

/// The claim loop's state: claimed runs waiting for a slot, executors, the
/// claim in flight.
pub(crate) struct ClaimLoop {
    pub(crate) pool: PgPool,
    pub(crate) worker: WorkerId,
    pub(crate) queues: Vec<String>,
    pub(crate) lease_ms: u64,
    pub(crate) concurrency: usize,
    /// Most runs held at once: slots plus prefetch.
    pub(crate) capacity: usize,
    /// Refill the prefetch buffer once it is this low, so claims come in
    /// large batches rather than one per finished run.
    pub(crate) low_water: usize,
    pub(crate) poll_interval: Duration,
    pub(crate) leases: Leases,
    pub(crate) context: Arc<Context>,
    /// Claimed runs not yet started (under lease, heartbeated).
    pub(crate) buffer: VecDeque<ClaimedRun>,
    pub(crate) tasks: JoinSet<TaskEnd>,
    /// The claim in flight, with the number of runs it asked for.
    pub(crate) claiming: Option<(ClaimFuture, usize)>,
    /// Runs shutdown interrupted, to hand back once outcomes are flushed.
    pub(crate) interrupted: Vec<Lease>,
    /// Set when a claim came back short: wait for a notification or a poll.
    pub(crate) drained: bool,
    /// Set when a queue's concurrency or rate limit cut the last claim
    /// short: claim again as soon as this worker frees a slot (the limit
    /// counts it), not only at the next poll.
    pub(crate) limited: bool,
    pub(crate) claim_failures: u32,
    pub(crate) report: WorkerReport,
}

impl ClaimLoop {
    pub(crate) fn new(worker: &Worker, leases: Leases, context: Arc<Context>) -> Self {
        let config = &worker.config;
        Self {
            pool: worker.pool.clone(),
            worker: worker.id,
            queues: config.queues.clone(),
            lease_ms: config.lease_ms,
            concurrency: config.concurrency,
            capacity: config.concurrency + config.prefetch,
            low_water: config.prefetch / 2,
            poll_interval: Duration::from_millis(config.poll_interval_ms.max(10)),
            leases,
            context,
            buffer: VecDeque::new(),
            tasks: JoinSet::new(),
            claiming: None,
            interrupted: Vec::new(),
            drained: false,
            limited: false,
            claim_failures: 0,
            report: WorkerReport::default(),
        }
    }

    /// Claims and executes until `shutdown` fires.
    pub(crate) async fn run(&mut self, wake: &Notify, shutdown: &CancellationToken) {
        let mut poll = tokio::time::interval(self.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.start_buffered();
            self.maybe_claim();
            tokio::select! {
                (claimed, asked) = async {
                    let (future, asked) = self.claiming.as_mut().expect("guarded by the branch condition");
                    (future.await, *asked)
                }, if self.claiming.is_some() => {
                    self.claiming = None;
                    if let Err(err) = self.on_claimed(claimed, asked) {
                        let delay = retry_delay(self.claim_failures);
                        tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64,
                            "claim failed");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.cancelled() => {}
                        }
                    }
                }
                Some(ended) = self.tasks.join_next(), if !self.tasks.is_empty() => self.record(ended),
                _ = self.leases.freed() => {
                    if self.limited {
                        self.drained = false;
                    }
                }
                _ = wake.notified() => self.drained = false,
                _ = poll.tick() => self.drained = false,
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Starts buffered runs while slots are free; a run whose lease was lost
    /// while it waited is dropped.
    fn start_buffered(&mut self) {
        while self.tasks.len() < self.concurrency {
            let Some(run) = self.buffer.pop_front() else {
                return;
            };
            match self.leases.signals(run.lease) {
                Some(signals) if !signals.lost.is_cancelled() => {
                    self.tasks.spawn(executor::execute_guarded(
                        run,
                        signals,
                        self.context.clone(),
                    ));
                }
                _ => {
                    self.report.dropped += 1;
                    self.leases.remove(run.lease);
                }
            }
        }
    }

    /// Sends a claim for the room left, if none is in flight and the queue
    /// may hold more.
    fn maybe_claim(&mut self) {
        // Held runs, not just running tasks: a run whose outcome waits in the
        // completer still holds its lease, so this bounds what the worker
        // keeps from other workers when its writes slow down.
        let room = self.capacity.saturating_sub(self.leases.len());
        if self.claiming.is_some()
            || self.drained
            || room == 0
            || self.buffer.len() > self.low_water
        {
            return;
        }
        let claim = claim(
            self.pool.clone(),
            self.worker,
            self.queues.clone(),
            room,
            self.lease_ms,
        );
        self.claiming = Some((claim, room));
    }

    /// Registers the runs a claim returned. The claim itself started their
    /// local lease deadline (from when it was sent).
    fn on_claimed(
        &mut self,
        claimed: Result<(runs::Claimed, Instant), DbError>,
        asked: usize,
    ) -> Result<(), DbError> {
        let (runs::Claimed { runs, limited }, sent) = match claimed {
            Ok(claimed) => claimed,
            Err(err) => {
                self.claim_failures += 1;
                self.drained = true;
                return Err(err);
            }
        };
        self.claim_failures = 0;
        // Compared with what this claim asked for, not with today's room:
        // runs that finished meanwhile must not make a full claim look like
        // an empty queue.
        self.drained = runs.len() < asked;
        self.limited = limited;
        self.report.claimed += runs.len() as u64;
        let deadline = sent + Duration::from_millis(self.lease_ms);
        for run in &runs {
            self.leases.insert(run.lease, deadline);
        }
        self.buffer.extend(runs);
        Ok(())
    }

    pub(crate) fn record(&mut self, ended: Result<TaskEnd, tokio::task::JoinError>) {
        match ended {
            Ok(TaskEnd::Handed) => self.report.finished += 1,
            Ok(TaskEnd::Dropped(lease)) => {
                self.report.dropped += 1;
                self.leases.remove(lease);
            }
            Ok(TaskEnd::Interrupted(lease)) => self.interrupted.push(lease),
            // `execute_guarded` catches panics, so only an abort (shutdown of
            // the runtime) lands here.
            Err(err) => tracing::error!(error = %err, "executor task failed"),
        }
    }
}

/// One claim statement on its own connection, with the instant it was sent:
/// the claimed runs' local lease deadlines count from it, since it is no later
/// than the database's `now()` that set their leases.
pub(crate) fn claim(
    pool: PgPool,
    worker: WorkerId,
    queues: Vec<String>,
    limit: usize,
    lease_ms: u64,
) -> ClaimFuture {
    Box::pin(async move {
        let mut conn = pool.acquire().await?;
        let sent = Instant::now();
        let claimed =
            runs::claim_limited_aware(&mut conn, worker, &queues, limit as i64, lease_ms as i64)
                .await?;
        Ok((claimed, sent))
    })
}
