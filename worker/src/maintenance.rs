//! Maintenance that runs inside every worker: rescuing runs whose lease
//! expired, marking silent workers gone, trimming each tenant's events to
//! its `stored_events` quota, pruning finished runs past retention, firing
//! cron schedules, letting sequenced runs go, and reporting transactions
//! left open on the cluster. Each service is coordinated
//! through Postgres (`SKIP LOCKED` on the rows it changes), so any number of
//! workers run it and none is special.

use std::time::Duration;

use runq_shared::db::runs::{self, RescueReport};
use runq_shared::db::DbError;
use runq_shared::db::{events, quotas, schedules, sequences, workers};
use runq_shared::protocol::Backoff;
use runq_shared::quotas::Quota;
use sqlx::PgPool;
use std::sync::Arc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Calls `pass` every `every` until `shutdown` fires, handing each result to
/// `report`: the loop every maintenance service runs.
///
/// # Cancel safety
///
/// Cancel-safe when `pass` is: each service's pass rolls back when dropped.
async fn every<T, F, Fut>(
    every: Duration,
    shutdown: CancellationToken,
    mut pass: F,
    report: impl Fn(Result<T, DbError>),
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        report(pass().await);
    }
}

/// Most runs one rescue statement takes back.
const RESCUE_BATCH: i64 = 1_000;

/// Takes back runs whose worker stopped heartbeating.
#[derive(Clone)]
pub struct Rescuer {
    pool: PgPool,
    backoff: Backoff,
    /// Workers silent this long are marked gone.
    stale_worker_ms: i64,
}

impl Rescuer {
    /// A rescuer retrying rescued runs with `backoff`.
    pub fn new(pool: PgPool, backoff: Backoff, stale_worker_ms: i64) -> Self {
        Self {
            pool,
            backoff,
            stale_worker_ms,
        }
    }

    /// One pass: rescues every expired lease (in batches) and marks silent
    /// workers gone, unless another worker holds the rescuer's lock right now
    /// (then it does nothing and reports nothing).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn run_once(&self) -> Result<RescueReport, DbError> {
        let mut conn = self.pool.acquire().await?;
        let mut total = RescueReport::default();
        loop {
            let report = runs::rescue_expired(&mut conn, RESCUE_BATCH, self.backoff).await?;
            total.led |= report.led;
            total.retried += report.retried;
            total.failed += report.failed;
            total.cancelled += report.cancelled;
            if !report.led {
                return Ok(total);
            }
            if report.retried + report.failed + report.cancelled < RESCUE_BATCH as u64 {
                workers::mark_gone(&mut conn, self.stale_worker_ms).await?;
                return Ok(total);
            }
        }
    }

    /// Calls [`Rescuer::run_once`] every `every` until `shutdown` fires.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a pass interrupted mid-statement rolls back.
    pub async fn run(self, period: Duration, shutdown: CancellationToken) {
        every(
            period,
            shutdown,
            || self.run_once(),
            |done| match done {
                Ok(report) if report.retried + report.failed + report.cancelled > 0 => {
                    tracing::info!(
                        retried = report.retried,
                        failed = report.failed,
                        cancelled = report.cancelled,
                        "rescued expired leases"
                    );
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "rescue pass failed"),
            },
        )
        .await;
    }
}

/// Events one trim statement deletes.
const TRIM_BATCH: i64 = 1_000;

/// Keeps each tenant's stored events within its `stored_events` quota: the
/// newest are kept, the oldest roll off.
#[derive(Clone)]
pub struct EventTrimmer {
    pool: PgPool,
}

impl EventTrimmer {
    /// A trimmer on `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// One pass over every tenant with a finite `stored_events` limit, in
    /// batches of 1,000; returns how many events went. A tenant another
    /// worker is trimming right now is skipped.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn run_once(&self) -> Result<u64, DbError> {
        let mut conn = self.pool.acquire().await?;
        let mut total = 0;
        for (tenant, keep) in quotas::finite_limits(&mut conn, Quota::StoredEvents).await? {
            loop {
                let gone = events::trim_oldest(&mut conn, tenant, keep, TRIM_BATCH).await?;
                total += gone;
                if gone < TRIM_BATCH as u64 {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// Calls [`EventTrimmer::run_once`] every `every` until `shutdown` fires.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: an interrupted statement rolls back.
    pub async fn run(self, period: Duration, shutdown: CancellationToken) {
        every(
            period,
            shutdown,
            || self.run_once(),
            |done| match done {
                Ok(0) => {}
                Ok(trimmed) => tracing::info!(trimmed, "trimmed events past stored_events quotas"),
                Err(err) => tracing::warn!(error = %err, "event trim failed"),
            },
        )
        .await;
    }
}

/// Runs one prune statement looks at.
const PRUNE_BATCH: i64 = 500;

/// Deletes finished runs (with their steps and events) past retention.
#[derive(Clone)]
pub struct Pruner {
    pool: PgPool,
    retention: runs::Retention,
}

impl Pruner {
    /// A pruner keeping finished runs as `retention` says.
    pub fn new(pool: PgPool, retention: runs::Retention) -> Self {
        Self { pool, retention }
    }

    /// One walk over `runs`, oldest first, in batches of 500, until it
    /// reaches runs too young to be past retention; returns how many runs
    /// went. Another worker's walk in progress makes this one stop at once.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn run_once(&self) -> Result<u64, DbError> {
        let mut conn = self.pool.acquire().await?;
        let caps = quotas::finite_limits(&mut conn, Quota::RetentionDays).await?;
        let mut after = None;
        let mut total = 0;
        loop {
            let batch =
                runs::prune_finished(&mut conn, after, PRUNE_BATCH, self.retention, &caps).await?;
            total += batch.deleted;
            if batch.done {
                return Ok(total);
            }
            after = batch.last;
        }
    }

    /// Calls [`Pruner::run_once`] every `every` until `shutdown` fires.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: an interrupted batch rolls back.
    pub async fn run(self, period: Duration, shutdown: CancellationToken) {
        every(
            period,
            shutdown,
            || self.run_once(),
            |done| match done {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "pruned finished runs past retention"),
                Err(err) => tracing::warn!(error = %err, "prune failed"),
            },
        )
        .await;
    }
}

/// Wakeups one promotion transaction takes.
const PROMOTE_BATCH: i64 = 500;

/// Lets the next run of each sequence key go when the run ahead of it lets
/// go of the key ([`sequences::promote`]).
#[derive(Clone)]
pub struct Sequencer {
    pool: PgPool,
}

impl Sequencer {
    /// A promoter on `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Promotes until no wakeup is left; returns the runs let go.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn run_once(&self) -> Result<u64, DbError> {
        let mut conn = self.pool.acquire().await?;
        let mut total = 0;
        loop {
            let report = sequences::promote(&mut conn, PROMOTE_BATCH).await?;
            total += report.promoted;
            for refusal in &report.refused {
                tracing::warn!(tenant.id = %refusal.tenant_id,
                    sequence_key = %refusal.sequence_key, reason = %refusal.reason,
                    "the database refused to let a sequenced run go; its key waits");
            }
            if report.woken < PROMOTE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Calls [`Sequencer::run_once`] when `wake` fires (a `runq_sequence`
    /// notification) and every `period` in case one was missed, until
    /// `shutdown` fires.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: an interrupted pass rolls back and keeps its wakeups.
    pub async fn run(self, period: Duration, wake: Arc<Notify>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(period) => {}
            }
            match self.run_once().await {
                Ok(0) => {}
                Ok(promoted) => tracing::debug!(promoted, "let sequenced runs go"),
                Err(err) => tracing::warn!(error = %err, "promoting sequenced runs failed"),
            }
        }
    }
}

/// Schedules one firing transaction handles.
const FIRE_BATCH: i64 = 100;

/// Fires due cron schedules: each tick's run exactly once across the fleet.
#[derive(Clone)]
pub struct Scheduler {
    pool: PgPool,
}

impl Scheduler {
    /// A scheduler on `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Fires every due schedule (in transactions of 100) and returns the
    /// total.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn run_once(&self) -> Result<schedules::FireReport, DbError> {
        let mut conn = self.pool.acquire().await?;
        let mut total = schedules::FireReport::default();
        loop {
            let report = schedules::fire_due(&mut conn, FIRE_BATCH).await?;
            total.fired += report.fired;
            total.failed += report.failed;
            if report.fired + report.failed < FIRE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Calls [`Scheduler::run_once`] every `every` until `shutdown` fires.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: an interrupted pass rolls back, and its ticks stay due.
    pub async fn run(self, period: Duration, shutdown: CancellationToken) {
        every(
            period,
            shutdown,
            || self.run_once(),
            |done| match done {
                Ok(report) if report.fired + report.failed > 0 => {
                    tracing::info!(
                        fired = report.fired,
                        failed = report.failed,
                        "fired schedules"
                    );
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "firing schedules failed"),
            },
        )
        .await;
    }
}

/// Reports transactions open on the cluster longer than a threshold: they
/// stop vacuum from cleaning the queue's dead rows (the classic way a
/// Postgres queue dies) and hold back webhooks and event streams.
#[derive(Clone)]
pub struct LongTransactionWatch {
    pool: PgPool,
    threshold_seconds: f64,
}

impl LongTransactionWatch {
    /// A watch reporting transactions older than `threshold_seconds`.
    pub fn new(pool: PgPool, threshold_seconds: f64) -> Self {
        Self {
            pool,
            threshold_seconds,
        }
    }

    /// One look: every transaction past the threshold, each logged at WARN
    /// with its pid, database, application, state, age and statement.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn run_once(&self) -> Result<Vec<workers::LongTransaction>, DbError> {
        let mut conn = self.pool.acquire().await?;
        let found = workers::long_transactions(&mut conn, self.threshold_seconds).await?;
        for tx in &found {
            tracing::warn!(
                pid = tx.pid,
                database = tx.database.as_deref().unwrap_or(""),
                application = tx.application.as_deref().unwrap_or(""),
                state = tx.state.as_deref().unwrap_or(""),
                seconds = tx.seconds.round(),
                query = tx.query.as_deref().unwrap_or(""),
                "a transaction has been open too long: it holds back vacuum, webhooks and streams"
            );
        }
        Ok(found)
    }

    /// Calls [`LongTransactionWatch::run_once`] every `every` until
    /// `shutdown` fires.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    pub async fn run(self, period: Duration, shutdown: CancellationToken) {
        every(
            period,
            shutdown,
            || self.run_once(),
            |done| {
                if let Err(err) = done {
                    tracing::warn!(error = %err, "looking for long transactions failed");
                }
            },
        )
        .await;
    }
}
