//! The worker: claims runs in batches, executes them in a `JoinSet`, and keeps
//! its leases alive; on shutdown it stops claiming, lets in-flight runs finish
//! within the grace period and hands the rest back.
//!
//! [`Worker::run`] is four named steps: register, start the services
//! (listener, heartbeat, lease guard, rescuer, completer), the claim loop
//! (`claim_loop`), and the shutdown drain; the listener, heartbeat and lease
//! guard live in `services`.

use std::sync::Arc;
use std::time::Duration;

use runq_shared::config::WorkerConfig;
use runq_shared::db::runs::{self, Retention};
use runq_shared::db::{workers, DbError};
use runq_shared::protocol::{Backoff, ClaimedRun, Lease};
use runq_shared::WorkerId;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::claim_loop::{claim, ClaimLoop};
use crate::completer::Completer;
use crate::executor::Context;
use crate::handler::{Handler, Handlers, Http};
use crate::leases::Leases;
use crate::maintenance::{
    EventTrimmer, LongTransactionWatch, Pruner, Rescuer, Scheduler, Sequencer,
};
use crate::outbound::OutboundPolicy;
use crate::relay::Relay;
use crate::services::{guard_leases, heartbeat, lease_guard, listen};

/// Time between passes of the event trimmer (the `stored_events` quota).
const TRIM_EVERY: Duration = Duration::from_secs(30);
/// Time between looks for transactions left open on the cluster.
const LONG_TRANSACTION_EVERY: Duration = Duration::from_secs(30);

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
    pub(crate) id: WorkerId,
    pub(crate) pool: PgPool,
    pub(crate) config: WorkerConfig,
    pub(crate) handlers: Handlers,
}

impl Worker {
    /// A worker with the built-in handlers and a fresh id.
    pub fn new(pool: PgPool, config: WorkerConfig) -> Self {
        let mut handlers = Handlers::builtin();
        handlers.register(Http::new(
            config.max_output_bytes,
            OutboundPolicy::new(config.outbound_allow.iter().copied()),
        ));
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
        .map(|(claimed, _)| claimed.runs)
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
        // An interval of zero would make a maintenance loop spin.
        for (name, ms) in [
            ("RUNQ_MAINTENANCE_MS", self.config.maintenance_ms),
            ("RUNQ_PRUNE_MS", self.config.prune_ms),
            ("RUNQ_OUTBOX_PRUNE_MS", self.config.relay.outbox_prune_ms),
        ] {
            if ms == 0 {
                return Err(WorkerError::Config(format!("{name} must be at least 1")));
            }
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
        let outbound_allow: Vec<String> = config
            .outbound_allow
            .iter()
            .map(ToString::to_string)
            .collect();
        tracing::info!(worker.id = %self.id, queues = ?config.queues,
            concurrency = config.concurrency, prefetch = config.prefetch,
            outbound_allow = ?outbound_allow, "worker started");
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
        let sequence_wake = Arc::new(Notify::new());
        services.spawn(listen(
            self.pool.clone(),
            leases.clone(),
            wake.clone(),
            sequence_wake.clone(),
            stop.clone(),
        ));
        services.spawn(Sequencer::new(self.pool.clone()).run(
            Duration::from_millis(config.maintenance_ms),
            sequence_wake,
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
        services.spawn(EventTrimmer::new(self.pool.clone()).run(TRIM_EVERY, stop.clone()));
        let retention = Retention {
            succeeded_seconds: config.retain_succeeded_hours * 3600.0,
            failed_seconds: config.retain_failed_hours * 3600.0,
        };
        services.spawn(
            Pruner::new(self.pool.clone(), retention)
                .run(Duration::from_millis(config.prune_ms), stop.clone()),
        );
        if config.long_transaction_seconds > 0.0 {
            services.spawn(
                LongTransactionWatch::new(self.pool.clone(), config.long_transaction_seconds)
                    .run(LONG_TRANSACTION_EVERY, stop.clone()),
            );
        }
        services.spawn(
            Scheduler::new(self.pool.clone())
                .run(Duration::from_millis(config.maintenance_ms), stop.clone()),
        );
        if config.relay.enabled {
            match Relay::new(
                self.pool.clone(),
                config.relay.clone(),
                OutboundPolicy::new(config.outbound_allow.iter().copied()),
            ) {
                Ok(relay) => {
                    services.spawn(relay.run(stop.clone()));
                }
                Err(err) => tracing::error!(error = %err, "the outbox relay cannot start"),
            }
        }
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
        // Finish claims already sent so their runs are released, not left to expire.
        let mut unstarted: Vec<Lease> = claims
            .buffer
            .drain()
            .into_iter()
            .map(|run| run.lease)
            .collect();
        for (claim, _) in [claims.claiming.take(), claims.express.take()]
            .into_iter()
            .flatten()
        {
            if let Ok((runq_shared::db::runs::Claimed { runs, .. }, sent)) = claim.await {
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
