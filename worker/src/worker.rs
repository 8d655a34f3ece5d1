//! The worker: claims runs in batches, executes them in a `JoinSet`, and keeps
//! its leases alive; on shutdown it stops claiming, lets in-flight runs finish
//! within the grace period and hands the rest back.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use runq_shared::config::WorkerConfig;
use runq_shared::db::runs::{self, Backoff, ClaimedRun, Lease};
use runq_shared::db::{workers, DbError, CANCEL_CHANNEL, PENDING_CHANNEL};
use runq_shared::WorkerId;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::completer::Completer;
use crate::executor::{self, Context, TaskEnd};
use crate::handler::{Handler, Handlers};
use crate::leases::Leases;
use crate::maintenance::Rescuer;

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The database failed while registering or shutting down.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The configuration cannot work.
    #[error("invalid worker configuration: {0}")]
    Config(String),
}

/// What a worker did before it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Runs claimed.
    pub claimed: u64,
    /// Runs whose outcome was handed to the completer.
    pub finished: u64,
    /// Runs handed back to pending at shutdown (unstarted or interrupted).
    pub released: u64,
    /// Runs dropped because their lease was taken over.
    pub dropped: u64,
}

/// A worker: any number may run against the same database, on any host.
pub struct Worker {
    id: WorkerId,
    pool: PgPool,
    config: WorkerConfig,
    handlers: Handlers,
}

type ClaimFuture = Pin<Box<dyn Future<Output = Result<Vec<ClaimedRun>, DbError>> + Send>>;

impl Worker {
    /// A worker with the built-in handlers and a fresh id.
    pub fn new(pool: PgPool, config: WorkerConfig) -> Self {
        Self {
            id: Uuid::now_v7(),
            pool,
            config,
            handlers: Handlers::builtin(),
        }
    }

    /// Adds a handler for a custom step kind.
    pub fn register(mut self, handler: impl Handler) -> Self {
        self.handlers.register(handler);
        self
    }

    /// This worker's id, as written into `runs.locked_by`.
    pub fn id(&self) -> WorkerId {
        self.id
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            base_ms: self.config.retry_base_ms as f64,
            max_ms: self.config.retry_max_ms as f64,
        }
    }

    /// Claims up to `limit` runs for this worker in one statement (the claim
    /// the run loop uses; exposed for tests and tools).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn claim(&self, limit: usize) -> Result<Vec<ClaimedRun>, DbError> {
        claim(
            self.pool.clone(),
            self.id,
            self.config.queues.clone(),
            limit,
            self.config.lease_ms,
        )
        .await
    }

    /// Runs until `shutdown` fires, then drains: no new claims, in-flight runs
    /// get the grace period, unfinished runs go back to pending uncharged, and
    /// every outcome is flushed before this returns.
    ///
    /// # Errors
    ///
    /// The worker could not register itself (database unreachable at start).
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerReport, WorkerError> {
        let config = &self.config;
        if config.concurrency == 0 {
            return Err(WorkerError::Config(
                "concurrency must be at least 1".to_owned(),
            ));
        }
        if config.queues.is_empty() {
            return Err(WorkerError::Config(
                "at least one queue is needed".to_owned(),
            ));
        }
        let hostname = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        {
            let mut conn = self.pool.acquire().await.map_err(DbError::from)?;
            workers::register(
                &mut conn,
                self.id,
                &hostname,
                std::process::id() as i32,
                &config.queues,
                config.concurrency as i32,
            )
            .await?;
        }
        tracing::info!(worker.id = %self.id, queues = ?config.queues,
            concurrency = config.concurrency, prefetch = config.prefetch, "worker started");

        let leases = Leases::default();
        let wake = Arc::new(Notify::new());
        // Services stop when `services_stop` fires; the JoinSet aborts them if
        // this function returns early.
        let services_stop = CancellationToken::new();
        let mut services = JoinSet::new();
        services.spawn(listen(
            self.pool.clone(),
            leases.clone(),
            wake.clone(),
            services_stop.clone(),
        ));
        services.spawn(heartbeat(
            self.pool.clone(),
            self.id,
            leases.clone(),
            Duration::from_millis(config.heartbeat_ms),
            config.lease_ms,
            services_stop.clone(),
        ));
        services.spawn(
            Rescuer::new(
                self.pool.clone(),
                self.backoff(),
                (config.lease_ms * 2) as i64,
            )
            .run(
                Duration::from_millis(config.maintenance_ms),
                services_stop.clone(),
            ),
        );

        let abandon = CancellationToken::new();
        let (completer, completer_done) = Completer::new(
            self.pool.clone(),
            self.id,
            leases.clone(),
            self.backoff(),
            config.complete_batch,
        )
        .start(abandon.clone());
        let completer_task = tokio::spawn(completer_done);
        let hard_stop = CancellationToken::new();
        let max_run_duration =
            Duration::from_secs_f64((config.max_run_duration_minutes * 60.0).max(0.001));
        let context = Arc::new(Context {
            handlers: self.handlers.clone(),
            completer,
            hard_stop: hard_stop.clone(),
            max_run_duration,
        });

        let mut report = WorkerReport::default();
        // Claimed runs not yet started, with the deadline of their duration cap.
        let mut buffer: VecDeque<(ClaimedRun, tokio::time::Instant)> = VecDeque::new();
        let mut tasks: JoinSet<TaskEnd> = JoinSet::new();
        // The claim in flight, with the number of runs it asked for.
        let mut claiming: Option<(ClaimFuture, usize)> = None;
        let mut interrupted: Vec<Lease> = Vec::new();
        // Set when a claim came back short: wait for a notification or a poll.
        let mut drained = false;
        let mut claim_failures = 0u32;
        let mut poll =
            tokio::time::interval(Duration::from_millis(config.poll_interval_ms.max(10)));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let capacity = config.concurrency + config.prefetch;
        // Refill the prefetch buffer once it is half empty, so claims come in
        // large batches rather than one per finished run.
        let low_water = config.prefetch / 2;

        loop {
            while tasks.len() < config.concurrency {
                let Some((run, deadline)) = buffer.pop_front() else {
                    break;
                };
                let lease = Lease {
                    id: run.id,
                    attempt: run.attempt,
                };
                match leases.signals(run.id) {
                    Some(signals) if !signals.lost.is_cancelled() => {
                        tasks.spawn(executor::execute(run, deadline, signals, context.clone()));
                    }
                    _ => leases.remove(lease),
                }
            }
            // Held runs, not just running tasks: a run whose outcome waits in
            // the completer still holds its lease, so this bounds what the
            // worker keeps from other workers when its writes slow down.
            let room = capacity.saturating_sub(leases.len());
            if claiming.is_none() && !drained && room > 0 && buffer.len() <= low_water {
                claiming = Some((
                    claim(
                        self.pool.clone(),
                        self.id,
                        config.queues.clone(),
                        room,
                        config.lease_ms,
                    ),
                    room,
                ));
            }
            tokio::select! {
                (claimed, asked) = async {
                    let (future, asked) = claiming.as_mut().expect("guarded by the branch condition");
                    (future.await, *asked)
                }, if claiming.is_some() =>
                {
                    claiming = None;
                    match claimed {
                        Ok(runs) => {
                            claim_failures = 0;
                            // Compared with what this claim asked for, not with
                            // today's room: runs that finished meanwhile must not
                            // make a full claim look like an empty queue.
                            drained = runs.len() < asked;
                            report.claimed += runs.len() as u64;
                            let now = tokio::time::Instant::now();
                            for run in runs {
                                leases.insert(Lease { id: run.id, attempt: run.attempt });
                                let deadline = now + executor::duration_limit(&run, max_run_duration);
                                buffer.push_back((run, deadline));
                            }
                        }
                        Err(err) => {
                            claim_failures += 1;
                            let backoff = Duration::from_millis(
                                (100u64 << claim_failures.min(6)).min(5_000));
                            tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64,
                                "claim failed");
                            drained = true;
                            tokio::select! {
                                _ = tokio::time::sleep(backoff) => {}
                                _ = shutdown.cancelled() => {}
                            }
                        }
                    }
                }
                Some(ended) = tasks.join_next(), if !tasks.is_empty() => {
                    record(ended, &mut report, &mut interrupted, &leases);
                }
                _ = leases.freed() => {}
                _ = wake.notified() => drained = false,
                _ = poll.tick() => drained = false,
                _ = shutdown.cancelled() => break,
            }
        }

        // Shutdown. Finish a claim already sent so its runs are released, not
        // left to expire.
        let mut unstarted: Vec<Lease> = buffer
            .drain(..)
            .map(|(run, _)| Lease {
                id: run.id,
                attempt: run.attempt,
            })
            .collect();
        if let Some((claim, _)) = claiming.take() {
            if let Ok(runs) = claim.await {
                report.claimed += runs.len() as u64;
                for run in runs {
                    let lease = Lease {
                        id: run.id,
                        attempt: run.attempt,
                    };
                    leases.insert(lease);
                    unstarted.push(lease);
                }
            }
        }
        report.released += self.release(&unstarted, &leases).await;
        tracing::info!(
            in_flight = tasks.len(),
            grace_ms = config.shutdown_grace_ms,
            "worker stopping: waiting for in-flight runs"
        );
        let grace = tokio::time::sleep(Duration::from_millis(config.shutdown_grace_ms));
        tokio::pin!(grace);
        loop {
            tokio::select! {
                ended = tasks.join_next() => match ended {
                    Some(ended) => record(ended, &mut report, &mut interrupted, &leases),
                    None => break,
                },
                _ = &mut grace, if !hard_stop.is_cancelled() => hard_stop.cancel(),
            }
        }
        // Flush every outcome (and checkpoint) before handing runs back, so a
        // released run resumes after its last finished step.
        drop(context);
        let flush_deadline = Duration::from_millis(config.shutdown_grace_ms.max(5_000));
        let abandon_timer = {
            let abandon = abandon.clone();
            async move {
                tokio::time::sleep(flush_deadline).await;
                abandon.cancel();
            }
        };
        tokio::select! {
            _ = completer_task => {}
            _ = abandon_timer => tracing::warn!("completer abandoned: the database stayed unreachable"),
        }
        report.released += self.release(&interrupted, &leases).await;
        services_stop.cancel();
        while services.join_next().await.is_some() {}
        if let Ok(mut conn) = self.pool.acquire().await {
            if let Err(err) = workers::stop(&mut conn, self.id).await {
                tracing::warn!(error = %err, "could not mark the worker stopped");
            }
        }
        tracing::info!(
            claimed = report.claimed,
            finished = report.finished,
            released = report.released,
            dropped = report.dropped,
            "worker stopped"
        );
        Ok(report)
    }

    /// Hands `leases` back to pending without charging the attempt.
    async fn release(&self, to_release: &[Lease], leases: &Leases) -> u64 {
        if to_release.is_empty() {
            return 0;
        }
        let released = match self.pool.acquire().await {
            Ok(mut conn) => runs::release_many(&mut conn, self.id, to_release).await,
            Err(err) => Err(err.into()),
        };
        for lease in to_release {
            leases.remove(*lease);
        }
        match released {
            Ok(ids) => ids.len() as u64,
            Err(err) => {
                // Their leases expire and the rescuer hands them on.
                tracing::warn!(error = %err, runs = to_release.len(), "could not release runs");
                0
            }
        }
    }
}

fn record(
    ended: Result<TaskEnd, tokio::task::JoinError>,
    report: &mut WorkerReport,
    interrupted: &mut Vec<Lease>,
    leases: &Leases,
) {
    match ended {
        Ok(TaskEnd::Handed) => report.finished += 1,
        Ok(TaskEnd::Dropped(lease)) => {
            report.dropped += 1;
            leases.remove(lease);
        }
        Ok(TaskEnd::Interrupted(lease)) => interrupted.push(lease),
        // Handler panics are caught inside the task and fail the step, so this
        // is only reached if the executor itself panicked: its lease stays
        // registered, and the run is written off when the worker stops.
        Err(err) => tracing::error!(error = %err, "executor task failed"),
    }
}

fn claim(
    pool: PgPool,
    worker: WorkerId,
    queues: Vec<String>,
    limit: usize,
    lease_ms: u64,
) -> ClaimFuture {
    Box::pin(async move {
        let mut conn = pool.acquire().await?;
        runs::claim(&mut conn, worker, &queues, limit as i64, lease_ms as i64).await
    })
}

/// Wakes the claim loop on `runq_pending` and cancels held runs named on
/// `runq_cancel`. Reconnects on its own; notifications lost meanwhile are
/// covered by polling and the heartbeat.
async fn listen(pool: PgPool, leases: Leases, wake: Arc<Notify>, stop: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener
                .listen_all([PENDING_CHANNEL, CANCEL_CHANNEL])
                .await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = stop.cancelled() => return,
            listener = listener => match listener {
                Ok(listener) => listener,
                Err(err) => {
                    failures += 1;
                    let backoff = Duration::from_millis((100u64 << failures.min(6)).min(5_000));
                    tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64,
                        "listener could not connect");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => continue,
                    }
                }
            },
        };
        failures = 0;
        // Runs may have arrived while we were not listening.
        wake.notify_one();
        loop {
            let notification = tokio::select! {
                _ = stop.cancelled() => return,
                notification = listener.try_recv() => notification,
            };
            match notification {
                Ok(Some(notification)) if notification.channel() == CANCEL_CHANNEL => {
                    let signals = notification
                        .payload()
                        .parse()
                        .ok()
                        .and_then(|id| leases.signals(id));
                    if let Some(signals) = signals {
                        signals.cancel.cancel();
                    }
                }
                Ok(Some(_)) => wake.notify_one(),
                // The connection dropped; try_recv reconnects on the next call.
                Ok(None) => wake.notify_one(),
                Err(err) => {
                    tracing::warn!(error = %err, "listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

/// Extends every held lease in one statement each `every`, drops runs whose
/// lease was taken over, passes on cancel requests and keeps the worker's own
/// row fresh.
async fn heartbeat(
    pool: PgPool,
    worker: WorkerId,
    leases: Leases,
    every: Duration,
    lease_ms: u64,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let held = leases.all();
        let beat = async {
            let mut conn = pool.acquire().await?;
            workers::heartbeat(&mut conn, worker).await?;
            if held.is_empty() {
                return Ok(Vec::new());
            }
            runs::extend_leases(&mut conn, worker, &held, lease_ms as i64).await
        };
        match beat.await {
            Ok(alive) => {
                let alive: std::collections::HashMap<_, _> = alive
                    .into_iter()
                    .map(|run| (run.id, run.cancel_requested))
                    .collect();
                for lease in held {
                    let Some(signals) = leases.signals(lease.id) else {
                        continue;
                    };
                    match alive.get(&lease.id) {
                        None => {
                            tracing::warn!(run.id = %lease.id, "lease lost; dropping the run");
                            signals.lost.cancel();
                            leases.remove(lease);
                        }
                        Some(true) => signals.cancel.cancel(),
                        Some(false) => {}
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "heartbeat failed"),
        }
    }
}
