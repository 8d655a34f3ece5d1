//! The claim loop: claims runs in batches up to the worker's capacity,
//! starts them as slots free up, and records how each executor ended.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use runq_shared::db::runs;
use runq_shared::db::DbError;
use runq_shared::protocol::Lease;
use runq_shared::WorkerId;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::executor::{self, Context, TaskEnd};
use crate::leases::Leases;
use crate::prefetch::{Buffer, Prefetch};
use crate::services::retry_delay;
use crate::worker::{Worker, WorkerReport};

/// The most runs an express claim asks for: few enough that it takes a few
/// milliseconds even on a loaded database. Its batch is shared out between
/// the queues' and tenants' groups like any claim's, so a run alone in its
/// queue gets the first turn.
pub(crate) const EXPRESS_CLAIM: usize = 32;

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
    /// How many runs to hold beyond the slots (see [`Prefetch`]). The buffer
    /// is refilled once it is down to half of that, so claims come in large
    /// batches rather than one per finished run.
    pub(crate) prefetch: Prefetch,
    pub(crate) poll_interval: Duration,
    pub(crate) leases: Leases,
    pub(crate) context: Arc<Context>,
    /// Claimed runs not yet started (under lease, heartbeated).
    pub(crate) buffer: Buffer,
    pub(crate) tasks: JoinSet<TaskEnd>,
    /// The claim in flight, with the number of runs it asked for.
    pub(crate) claiming: Option<(ClaimFuture, usize)>,
    /// A small claim sent when a notification came, beside a large one in
    /// flight or instead of one not yet due: a large claim takes tens of
    /// milliseconds under load.
    pub(crate) express: Option<(ClaimFuture, usize)>,
    /// Runs shutdown interrupted, to hand back once outcomes are flushed.
    pub(crate) interrupted: Vec<Lease>,
    /// Set when a claim came back short: wait for a notification or a poll.
    pub(crate) drained: bool,
    /// Set when a notification said runs were enqueued: send an express
    /// claim at the next chance even if the buffer is not yet down to its
    /// refill mark, so a run enqueued while this worker drains a backlog (of
    /// its own queue or another) waits for one small claim, not for the
    /// buffer to run down and a large claim to come back.
    pub(crate) woken: bool,
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
            prefetch: Prefetch::new(config.concurrency, config.prefetch, Instant::now()),
            poll_interval: Duration::from_millis(config.poll_interval_ms.max(10)),
            leases,
            context,
            buffer: Buffer::default(),
            tasks: JoinSet::new(),
            claiming: None,
            express: None,
            interrupted: Vec::new(),
            drained: false,
            woken: false,
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
                    if let Err(err) = self.on_claimed(claimed, asked, false) {
                        let delay = retry_delay(self.claim_failures);
                        tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64,
                            "claim failed");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.cancelled() => {}
                        }
                    }
                }
                (claimed, asked) = async {
                    let (future, asked) = self.express.as_mut().expect("guarded by the branch condition");
                    (future.await, *asked)
                }, if self.express.is_some() => {
                    self.express = None;
                    // The large claim beside it decides whether the queues
                    // are drained and backs off after failures.
                    if let Err(err) = self.on_claimed(claimed, asked, true) {
                        tracing::warn!(error = %err, "express claim failed");
                    }
                }
                Some(ended) = self.tasks.join_next(), if !self.tasks.is_empty() => self.record(ended),
                _ = self.leases.freed() => {
                    if self.limited {
                        self.drained = false;
                    }
                }
                _ = wake.notified() => {
                    self.drained = false;
                    self.woken = true;
                }
                _ = poll.tick() => self.drained = false,
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Starts buffered runs while slots are free; a run whose lease was lost
    /// while it waited is dropped.
    fn start_buffered(&mut self) {
        while self.tasks.len() < self.concurrency {
            let Some(run) = self.buffer.pop() else {
                return;
            };
            match self.leases.signals(run.lease) {
                Some(signals) if !signals.lost.is_cancelled() => {
                    self.prefetch.started();
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

    /// Sends a claim for the room left when the buffer is down to its refill
    /// mark, none is in flight and the queues may hold more; or, when a
    /// notification came and no refill is due (or one is in flight), an
    /// express claim of at most [`EXPRESS_CLAIM`] runs.
    fn maybe_claim(&mut self) {
        // Held runs, not just running tasks: a run whose outcome waits in the
        // completer still holds its lease, so this bounds what the worker
        // keeps from other workers when its writes slow down. Runs asked for
        // by claims in flight count too.
        let target = self.prefetch.target(Instant::now());
        let asked = |claim: &Option<(ClaimFuture, usize)>| claim.as_ref().map_or(0, |(_, n)| *n);
        let in_flight = asked(&self.claiming) + asked(&self.express);
        let room = (self.concurrency + target).saturating_sub(self.leases.len() + in_flight);
        if room == 0 {
            return;
        }
        let refill = !self.drained && self.buffer.len() <= target / 2;
        if self.claiming.is_none() && refill {
            self.woken = false;
            self.claiming = Some((self.claim(room), room));
        } else if self.woken && self.express.is_none() {
            let room = room.min(EXPRESS_CLAIM);
            self.woken = false;
            self.express = Some((self.claim(room), room));
        }
    }

    fn claim(&self, limit: usize) -> ClaimFuture {
        claim(
            self.pool.clone(),
            self.worker,
            self.queues.clone(),
            limit,
            self.lease_ms,
        )
    }

    /// Registers the runs a claim returned. The claim itself started their
    /// local lease deadline (from when it was sent).
    fn on_claimed(
        &mut self,
        claimed: Result<(runs::Claimed, Instant), DbError>,
        asked: usize,
        express: bool,
    ) -> Result<(), DbError> {
        let (runs::Claimed { runs, limited }, sent) = match claimed {
            Ok(claimed) => claimed,
            Err(err) if express => return Err(err),
            Err(err) => {
                self.claim_failures += 1;
                self.drained = true;
                return Err(err);
            }
        };
        if !express {
            self.claim_failures = 0;
            // Compared with what this claim asked for, not with today's room:
            // runs that finished meanwhile must not make a full claim look
            // like an empty queue.
            self.drained = runs.len() < asked;
            self.limited = limited;
        }
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
