//! The drain phase: `n` queued runs, one worker process started cold, and the
//! time until the database shows every run `succeeded`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use runq_devtools::bench_db;
use serde::Serialize;

use super::clock::DbClock;
use super::flow::Flow;
use super::harness::Harness;
use super::process::megabytes;
use super::progress::Bar;
use super::worker::WorkerProcess;
use super::{enqueue, per_second, whole_ms, QUEUE};

/// How often the tool asks whether the queue is drained. The question reads
/// the heads of two partial indexes, so asking often costs the worker and
/// Postgres next to nothing and the measured time overshoots by at most this.
const POLL: Duration = Duration::from_millis(5);
/// How often the succeeded runs are counted, for the progress bar and the
/// stall check. A count scans the queue's runs, so it is kept rare: counting
/// every few milliseconds would take a core's worth of time from the drain.
const COUNT_EVERY: Duration = Duration::from_millis(500);
/// A drain that makes no progress for this long has failed.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One drain.
#[derive(Serialize, Debug)]
pub struct DrainReport {
    /// The worker's slots.
    concurrency: usize,
    /// Runs drained.
    jobs: u64,
    /// From just before the worker was started until all runs had succeeded.
    ms: u64,
    /// `jobs` over `ms`.
    jobs_per_s: u64,
    /// From just before the worker was started until it claimed its first
    /// run (database clock): process start, connecting, migration check,
    /// registration and the first claim.
    startup_ms: u64,
    /// WAL the server wrote per run over the whole lifecycle: the bulk
    /// enqueue that filled the queue and the drain (everything the server
    /// wrote meanwhile counts, so give the bench a quiet server).
    wal_bytes_per_job: u64,
    /// The worker process's peak resident set during the drain, in MB
    /// (absent where `/proc` is not there).
    worker_peak_rss_mb: Option<f64>,
}

/// One drain per value of `concurrencies`, each of `n` runs.
///
/// # Errors
///
/// Database errors, or a worker that exits, stalls or cannot be stopped.
pub async fn run(
    harness: &Harness,
    n: u64,
    concurrencies: &[usize],
    flow: Flow,
) -> anyhow::Result<Vec<DrainReport>> {
    let tenants = super::flow::apply(harness, flow).await?;
    let mut reports = Vec::with_capacity(concurrencies.len());
    let mut drained = Ok(());
    for &concurrency in concurrencies {
        match drain(harness, n, concurrency, &tenants).await {
            Ok(report) => reports.push(report),
            Err(err) => {
                drained = Err(err);
                break;
            }
        }
    }
    // The limit goes whatever happened: the queue is the user's database's.
    super::flow::clear(harness).await?;
    drained?;
    harness.reset().await?;
    Ok(reports)
}

async fn drain(
    harness: &Harness,
    n: u64,
    concurrency: usize,
    tenants: &[runq_shared::TenantId],
) -> anyhow::Result<DrainReport> {
    harness.reset().await?;
    let mut wal = harness.pool.acquire().await.context("connecting")?;
    let wal_before = bench_db::wal_position(&mut wal)
        .await
        .context("reading the WAL position")?;
    backlog(harness, n, tenants, &format!("drain c={concurrency}")).await?;
    let mut conn = harness.pool.acquire().await.context("connecting")?;

    let bar = harness.progress.bar(format!("drain c={concurrency}"), n);
    let clock = DbClock::read(&harness.pool).await?;
    let spawned_at = Instant::now();
    let mut worker = harness.spawn_worker(concurrency)?;
    let drained = watch(
        &mut conn,
        &mut worker,
        n,
        bar,
        &format!("drain c={concurrency}"),
    )
    .await?;
    let elapsed = drained.seen_at.duration_since(spawned_at);
    let first_start = bench_db::runs_first_started_at(&mut conn, QUEUE)
        .await
        .context("reading when the first run started")?
        .context("all runs succeeded but none has a start time")?;
    drop(conn);
    let wal_after = bench_db::wal_position(&mut wal)
        .await
        .context("reading the WAL position")?;
    drop(wal);
    let peak_rss = worker.peak_rss_bytes();
    worker.stop().await?;
    let startup_ms = clock.ms_from(spawned_at, first_start).max(0.0).round() as u64;
    Ok(DrainReport {
        concurrency,
        jobs: n,
        ms: whole_ms(elapsed),
        jobs_per_s: per_second(n, elapsed),
        startup_ms,
        wal_bytes_per_job: u64::try_from(wal_after - wal_before).unwrap_or(0) / n.max(1),
        worker_peak_rss_mb: peak_rss.map(megabytes),
    })
}

/// Queues `n` runs on the bench queue with the library's bulk path, spread
/// over `tenants`, checks they are all there and ANALYZEs the run tables,
/// so a drain is planned for the rows it will meet. `what` labels the
/// progress bar and names the measurement in errors.
///
/// # Errors
///
/// Database errors, or the queue does not hold `n` runs.
pub async fn backlog(
    harness: &Harness,
    n: u64,
    tenants: &[runq_shared::TenantId],
    what: &str,
) -> anyhow::Result<()> {
    let filling = harness.progress.bar(format!("{what}: enqueue"), n);
    enqueue::fill(harness, n, tenants, &filling).await?;
    filling.finish();
    super::check_count(harness, n, what).await?;
    let mut conn = harness.pool.acquire().await.context("connecting")?;
    bench_db::analyze(&mut conn)
        .await
        .context("analyzing the run tables")
}

/// When [`watch`] saw the bench queue drained.
#[derive(Debug, Clone, Copy)]
pub struct Drained {
    /// The first check that found no run of the queue pending or running:
    /// the drain ended at most [`POLL`] (and the check's round trip) before.
    pub seen_at: Instant,
    /// The last check that still found one, if any did: the queue was
    /// certainly still draining then.
    pub last_busy_at: Option<Instant>,
}

/// Watches `worker` drain the bench queue of its `n` runs: returns once no
/// run of the queue is pending or running and all `n` have succeeded,
/// counting them into `bar` (finished on success). Only the bench queue is
/// looked at, so runs on other queues the worker serves do not count.
///
/// # Errors
///
/// Database errors, the worker exits, no run succeeds for 60 s, or the
/// queue is drained with fewer than `n` runs succeeded. `what` names the
/// measurement in the message.
pub async fn watch(
    conn: &mut sqlx::PgConnection,
    worker: &mut WorkerProcess,
    n: u64,
    bar: Bar,
    what: &str,
) -> anyhow::Result<Drained> {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (0, Instant::now());
    let mut counted_at = Instant::now();
    let mut last_busy_at = None;
    let seen_at = loop {
        tick.tick().await;
        let checked_at = Instant::now();
        let unfinished = bench_db::runs_unfinished(&mut *conn, QUEUE)
            .await
            .context("checking for unfinished runs")?;
        if !unfinished {
            break Instant::now();
        }
        last_busy_at = Some(checked_at);
        if counted_at.elapsed() < COUNT_EVERY {
            continue;
        }
        counted_at = Instant::now();
        let succeeded = succeeded(&mut *conn).await?;
        bar.set(succeeded);
        worker.check_alive()?;
        if succeeded > last.0 {
            last = (succeeded, Instant::now());
        } else if last.1.elapsed() > STALL_TIMEOUT {
            bail!(
                "{what}: no run succeeded for {} s ({succeeded} of {n} done)",
                STALL_TIMEOUT.as_secs()
            );
        }
    };
    let succeeded = succeeded(&mut *conn).await?;
    if succeeded != n {
        bail!("{what}: the queue is drained but {succeeded} of {n} runs succeeded");
    }
    bar.set(n);
    bar.finish();
    Ok(Drained {
        seen_at,
        last_busy_at,
    })
}

async fn succeeded(conn: &mut sqlx::PgConnection) -> anyhow::Result<u64> {
    let succeeded = bench_db::runs_succeeded_count(conn, QUEUE)
        .await
        .context("counting succeeded runs")?;
    Ok(u64::try_from(succeeded).unwrap_or(0))
}
