//! The worker: claims runs in batches, executes them in a `JoinSet`, and keeps
//! its leases alive; on shutdown it stops claiming, lets in-flight runs finish
//! within the grace period and hands the rest back.
//!
//! [`Worker::run`] is four named steps: register, start the services
//! (listener, heartbeat, lease guard, rescuer, completer), the claim loop
//! ([`ClaimLoop`]), and the shutdown drain.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use runq_shared::config::WorkerConfig;
use runq_shared::db::runs;
use runq_shared::db::{workers, DbError, CANCEL_CHANNEL, PENDING_CHANNEL};
use runq_shared::protocol::{Backoff, ClaimedRun, Lease};
use runq_shared::WorkerId;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::completer::Completer;
use crate::executor::{self, Context, TaskEnd};
use crate::handler::{Handler, Handlers, Http};
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
    /// Runs dropped because their lease was taken over or could have expired.
    pub dropped: u64,
}

/// A worker: any number may run against the same database, on any host.
pub struct Worker {
    id: WorkerId,
    pool: PgPool,
    config: WorkerConfig,
    handlers: Handlers,
}

/// A claim in flight: the runs, and the instant the statement was sent.
type ClaimFuture =
    Pin<Box<dyn Future<Output = Result<(Vec<ClaimedRun>, Instant), DbError>> + Send>>;

/// Delay before the next try after `failures` failures in a row of a claim or
/// a listener connection: 200 ms doubling up to 5 s.
fn retry_delay(failures: u32) -> Duration {
    Duration::from_millis((100u64 << failures.min(6)).min(5_000))
}

/// How long before its local lease deadline a run is dropped: a tenth of the
/// lease, at least 50 ms. It covers the time the abort takes to reach the
/// step in flight, so the step stops before the database could expire the
/// lease and the rescuer hand the run to another worker.
fn lease_guard(lease_ms: u64) -> Duration {
    Duration::from_millis((lease_ms / 10).max(50))
}

impl Worker {
    /// A worker with the built-in handlers and a fresh id.
    pub fn new(pool: PgPool, config: WorkerConfig) -> Self {
        let mut handlers = Handlers::builtin();
        handlers.register(Http::new(config.max_output_bytes));
        Self {
            id: Uuid::now_v7(),
            pool,
            config,
            handlers,
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
        .map(|(runs, _)| runs)
    }

    /// Runs until `shutdown` fires, then drains: no new claims, in-flight runs
    /// get the grace period, unfinished runs go back to pending uncharged, and
    /// every outcome is flushed before this returns.
    ///
    /// # Errors
    ///
    /// The configuration cannot work, or the worker could not register itself
    /// (database unreachable at start).
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerReport, WorkerError> {
        self.check_config()?;
        self.register_self().await?;
        let leases = Leases::default();
        let wake = Arc::new(Notify::new());
        let services_stop = CancellationToken::new();
        // The JoinSet aborts the services if this function returns early.
        let mut services = self.start_services(&leases, &wake, &services_stop);

        let abandon = CancellationToken::new();
        let (completer, completer_done) = Completer::new(
            self.pool.clone(),
            leases.clone(),
            self.backoff(),
            self.config.complete_batch,
        )
        .start(abandon.clone());
        let completer_task = tokio::spawn(completer_done);
        let hard_stop = CancellationToken::new();
        let context = Arc::new(Context {
            handlers: self.handlers.clone(),
            completer,
            hard_stop: hard_stop.clone(),
            max_run_duration: Duration::from_secs_f64(
                (self.config.max_run_duration_minutes * 60.0).max(0.001),
            ),
            max_output_bytes: self.config.max_output_bytes,
        });

        let mut claims = ClaimLoop::new(&self, leases.clone(), context);
        claims.run(&wake, &shutdown).await;

        let report = self
            .shut_down(claims, &leases, hard_stop, completer_task, abandon)
            .await;
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

    fn check_config(&self) -> Result<(), WorkerError> {
        if self.config.concurrency == 0 {
            return Err(WorkerError::Config(
                "concurrency must be at least 1".to_owned(),
            ));
        }
        if self.config.queues.is_empty() {
            return Err(WorkerError::Config(
                "at least one queue is needed".to_owned(),
            ));
        }
        if self.config.heartbeat_ms >= self.config.lease_ms {
            return Err(WorkerError::Config(format!(
                "heartbeat every {} ms cannot keep a lease of {} ms alive; make RUNQ_HEARTBEAT_MS shorter than RUNQ_LEASE_MS",
                self.config.heartbeat_ms, self.config.lease_ms
            )));
        }
        Ok(())
    }

    async fn register_self(&self) -> Result<(), WorkerError> {
        let config = &self.config;
        let hostname = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
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
        tracing::info!(worker.id = %self.id, queues = ?config.queues,
            concurrency = config.concurrency, prefetch = config.prefetch, "worker started");
        Ok(())
    }

    /// The listener, the heartbeat, the lease guard and the rescuer; they stop
    /// when `stop` fires.
    fn start_services(
        &self,
        leases: &Leases,
        wake: &Arc<Notify>,
        stop: &CancellationToken,
    ) -> JoinSet<()> {
        let config = &self.config;
        let mut services = JoinSet::new();
        services.spawn(listen(
            self.pool.clone(),
            leases.clone(),
            wake.clone(),
            stop.clone(),
        ));
        services.spawn(heartbeat(
            self.pool.clone(),
            self.id,
            leases.clone(),
            Duration::from_millis(config.heartbeat_ms),
            config.lease_ms,
            stop.clone(),
        ));
        services.spawn(guard_leases(
            leases.clone(),
            lease_guard(config.lease_ms),
            stop.clone(),
        ));
        services.spawn(
            Rescuer::new(
                self.pool.clone(),
                self.backoff(),
                (config.lease_ms * 2) as i64,
            )
            .run(Duration::from_millis(config.maintenance_ms), stop.clone()),
        );
        services
    }

    /// Shutdown: hands back unstarted runs, gives in-flight runs the grace
    /// period, flushes every outcome, then hands back the interrupted runs.
    async fn shut_down(
        &self,
        mut claims: ClaimLoop,
        leases: &Leases,
        hard_stop: CancellationToken,
        completer_task: tokio::task::JoinHandle<()>,
        abandon: CancellationToken,
    ) -> WorkerReport {
        let config = &self.config;
        // Finish a claim already sent so its runs are released, not left to expire.
        let mut unstarted: Vec<Lease> = claims.buffer.drain(..).map(|run| run.lease).collect();
        if let Some((claim, _)) = claims.claiming.take() {
            if let Ok((runs, sent)) = claim.await {
                claims.report.claimed += runs.len() as u64;
                let deadline = sent + Duration::from_millis(config.lease_ms);
                for run in runs {
                    leases.insert(run.lease, deadline);
                    unstarted.push(run.lease);
                }
            }
        }
        claims.report.released += self.release(&unstarted, leases).await;
        tracing::info!(
            in_flight = claims.tasks.len(),
            grace_ms = config.shutdown_grace_ms,
            "worker stopping: waiting for in-flight runs"
        );
        let grace = tokio::time::sleep(Duration::from_millis(config.shutdown_grace_ms));
        tokio::pin!(grace);
        loop {
            tokio::select! {
                ended = claims.tasks.join_next() => match ended {
                    Some(ended) => claims.record(ended),
                    None => break,
                },
                _ = &mut grace, if !hard_stop.is_cancelled() => hard_stop.cancel(),
            }
        }
        // Flush every outcome (and checkpoint) before handing runs back, so a
        // released run resumes after its last finished step.
        drop(claims.context);
        let flush_deadline = Duration::from_millis(config.shutdown_grace_ms.max(5_000));
        let abandon_timer = async move {
            tokio::time::sleep(flush_deadline).await;
            abandon.cancel();
        };
        tokio::select! {
            _ = completer_task => {}
            _ = abandon_timer => tracing::warn!("completer abandoned: the database stayed unreachable"),
        }
        claims.report.released += self.release(&claims.interrupted, leases).await;
        claims.report
    }

    /// Hands `leases` back to pending without charging the attempt.
    async fn release(&self, to_release: &[Lease], leases: &Leases) -> u64 {
        if to_release.is_empty() {
            return 0;
        }
        let released = match self.pool.acquire().await {
            Ok(mut conn) => runs::release_many(&mut conn, to_release).await,
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

/// The claim loop's state: claimed runs waiting for a slot, executors, the
/// claim in flight.
struct ClaimLoop {
    pool: PgPool,
    worker: WorkerId,
    queues: Vec<String>,
    lease_ms: u64,
    concurrency: usize,
    /// Most runs held at once: slots plus prefetch.
    capacity: usize,
    /// Refill the prefetch buffer once it is this low, so claims come in
    /// large batches rather than one per finished run.
    low_water: usize,
    poll_interval: Duration,
    leases: Leases,
    context: Arc<Context>,
    /// Claimed runs not yet started (under lease, heartbeated).
    buffer: VecDeque<ClaimedRun>,
    tasks: JoinSet<TaskEnd>,
    /// The claim in flight, with the number of runs it asked for.
    claiming: Option<(ClaimFuture, usize)>,
    /// Runs shutdown interrupted, to hand back once outcomes are flushed.
    interrupted: Vec<Lease>,
    /// Set when a claim came back short: wait for a notification or a poll.
    drained: bool,
    claim_failures: u32,
    report: WorkerReport,
}

impl ClaimLoop {
    fn new(worker: &Worker, leases: Leases, context: Arc<Context>) -> Self {
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
            claim_failures: 0,
            report: WorkerReport::default(),
        }
    }

    /// Claims and executes until `shutdown` fires.
    async fn run(&mut self, wake: &Notify, shutdown: &CancellationToken) {
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
                _ = self.leases.freed() => {}
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
        claimed: Result<(Vec<ClaimedRun>, Instant), DbError>,
        asked: usize,
    ) -> Result<(), DbError> {
        let (runs, sent) = match claimed {
            Ok(runs) => runs,
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
        self.report.claimed += runs.len() as u64;
        let deadline = sent + Duration::from_millis(self.lease_ms);
        for run in &runs {
            self.leases.insert(run.lease, deadline);
        }
        self.buffer.extend(runs);
        Ok(())
    }

    fn record(&mut self, ended: Result<TaskEnd, tokio::task::JoinError>) {
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
fn claim(
    pool: PgPool,
    worker: WorkerId,
    queues: Vec<String>,
    limit: usize,
    lease_ms: u64,
) -> ClaimFuture {
    Box::pin(async move {
        let mut conn = pool.acquire().await?;
        let sent = Instant::now();
        let runs = runs::claim(&mut conn, worker, &queues, limit as i64, lease_ms as i64).await?;
        Ok((runs, sent))
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
                    let delay = retry_delay(failures);
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64,
                        "listener could not connect");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
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
                        .and_then(|id| leases.signals_of(id));
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

/// Extends every held lease in one statement each `every`, renews the local
/// deadlines of the leases it extended, drops runs whose lease was taken
/// over, passes on cancel requests and keeps the worker's own row fresh.
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
                return Ok((Vec::new(), Instant::now()));
            }
            // Sent now: the database sets the new expiry no earlier.
            let sent = Instant::now();
            let alive = runs::extend_leases(&mut conn, &held, lease_ms as i64).await?;
            Ok::<_, DbError>((alive, sent))
        };
        match beat.await {
            Ok((alive, sent)) => {
                let alive: std::collections::HashMap<_, _> =
                    alive.into_iter().map(|run| (run.id, run)).collect();
                let mut extended = Vec::with_capacity(held.len());
                for lease in held {
                    match alive.get(&lease.id) {
                        None => {
                            if leases.signals(lease).is_some() {
                                tracing::warn!(run.id = %lease.id, "lease lost; dropping the run");
                                leases.lose(lease);
                            }
                        }
                        Some(run) => {
                            if run.extended {
                                extended.push(lease);
                            }
                            if run.cancel_requested {
                                if let Some(signals) = leases.signals(lease) {
                                    signals.cancel.cancel();
                                }
                            }
                        }
                    }
                }
                leases.renew(&extended, sent + Duration::from_millis(lease_ms));
            }
            Err(err) => tracing::warn!(error = %err, "heartbeat failed"),
        }
    }
}

/// The lease guard: drops every held run `margin` before its local lease
/// deadline, aborting the step in flight. While heartbeats succeed the
/// deadlines keep moving and it does nothing; when this worker loses Postgres
/// it stops acting on its runs before the rescuer could hand them to another
/// worker (DESIGN.md, invariant 1).
async fn guard_leases(leases: Leases, margin: Duration, stop: CancellationToken) {
    // New claims and renewals only move deadlines later, so sleeping until the
    // earliest one known misses nothing; the cap bounds the wait when no run
    // is held.
    const IDLE: Duration = Duration::from_millis(250);
    loop {
        let now = Instant::now();
        let wake_at = leases
            .earliest_deadline()
            .map(|deadline| deadline.checked_sub(margin).unwrap_or(now))
            .unwrap_or(now + IDLE)
            .min(now + IDLE);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(wake_at) => {}
        }
        let overdue = leases.expire_overdue(Instant::now() + margin);
        if !overdue.is_empty() {
            tracing::warn!(
                runs = overdue.len(),
                margin_ms = margin.as_millis() as u64,
                "leases may be about to expire (no heartbeat got through); aborting their runs"
            );
        }
    }
}
