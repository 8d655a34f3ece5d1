//! The soak phase (issue "bloat under churn"): `n` runs pushed through
//! enqueue, claim, completion and pruning by one worker process, with a
//! backlog kept queued the whole time, to show that claim latency and table
//! sizes stay flat however many runs have gone through.
//!
//! The enqueuer (this process, the library's `enqueue_many`, 1,000 runs per
//! transaction) tops the queue up to `--soak-backlog` pending runs whenever
//! it falls below; the worker drains it with its pruner deleting succeeded
//! runs about a second after they finish and its relay pruning the outbox
//! as fast. Every 2.5 % of the runs (and at least every 10 s) a sample reads
//! the real claim statement's time and every hot table's and index's size.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use runq_devtools::soak_db::{self, HOT_TABLES};
use runq_shared::db;
use sqlx::PgPool;

use super::harness::Harness;
use super::soak_report::{self, round3, Sample, Summary, TableSample};
use super::{enqueue, per_second, whole_ms, BATCH, QUEUE};

/// How often the enqueuer looks at the backlog.
const TICK: Duration = Duration::from_millis(200);
/// Batches the enqueuer inserts per tick at most, so sampling and the stall
/// check keep their pace while it catches up.
const MAX_BATCHES_PER_TICK: u64 = 10;
/// Samples over the whole soak (one per 2.5 % of the runs).
const SAMPLES: u64 = 40;
/// Longest time between two samples.
const MAX_SAMPLE_GAP: Duration = Duration::from_secs(10);
/// Runs a probe claim asks for: what a worker with 50 free slots asks for.
const CLAIM_LIMIT: i64 = 50;
/// Probe claims per sample; the median is reported.
const CLAIM_PROBES: usize = 3;
/// A soak in which no run finishes for this long has failed.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the soak waits, once every run is finished, for the pruner to
/// delete the last of them before the final sample.
const PRUNE_WAIT: Duration = Duration::from_secs(30);

/// Worker settings the soak needs, given to the worker unless the same
/// variable is set in the environment (which then wins, and is named in the
/// report's `settings` like every inherited `RUNQ_*`).
const WORKER_ENV: [(&str, &str); 4] = [
    // Succeeded runs go about 1 s after they finish (0.0003 h = 1.08 s).
    ("RUNQ_RETAIN_SUCCEEDED_HOURS", "0.0003"),
    // The pruner passes every second instead of every 10 s.
    ("RUNQ_PRUNE_MS", "1000"),
    // Outbox rows go about 1 s after the relay has passed them...
    ("RUNQ_OUTBOX_RETENTION_HOURS", "0.0003"),
    // ...in a pass every second instead of every minute.
    ("RUNQ_OUTBOX_PRUNE_MS", "1000"),
];

/// The soak's settings.
#[derive(Debug, Clone, Copy)]
pub struct SoakArgs {
    /// Runs pushed through.
    pub n: u64,
    /// Pending runs kept queued.
    pub backlog: u64,
    /// The worker's slots.
    pub concurrency: usize,
}

/// The phase's output: the samples (`soak` in the report) and their summary
/// (`soak_summary`).
pub struct SoakOutcome {
    pub samples: Vec<Sample>,
    pub summary: Summary,
}

/// Runs the soak on an empty queue and leaves it empty.
///
/// # Errors
///
/// Database errors, or a worker that exits or stalls.
pub async fn run(harness: &Harness, args: SoakArgs) -> anyhow::Result<SoakOutcome> {
    harness.reset().await?;
    let mut conn = harness.pool.acquire().await.context("connecting")?;
    let server = soak_db::autovacuum_settings(&mut conn)
        .await
        .context("reading the server's autovacuum settings")?;
    let mut reloptions = BTreeMap::new();
    for table in HOT_TABLES {
        let options = soak_db::reloptions(&mut conn, table)
            .await
            .with_context(|| format!("reading the storage parameters of {table}"))?;
        reloptions.insert(table.to_owned(), options);
    }
    let worker_env = worker_env();
    harness.progress.log(format_args!(
        "soak: {} runs, backlog {}, concurrency {}; worker env {}; server {}",
        args.n,
        args.backlog,
        args.concurrency,
        worker_env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        server.join(" "),
    ));

    let mut enqueued = 0;
    enqueue_up_to(harness, &mut enqueued, args.backlog.min(args.n), u64::MAX).await?;
    runq_devtools::bench_db::analyze(&mut conn)
        .await
        .context("analyzing the run tables")?;

    let started = Instant::now();
    let mut sampler = Sampler::new(&harness.pool, started, args.n);
    sampler.take(&mut conn, enqueued).await?;
    let mut worker = harness.spawn_worker_with(&[QUEUE], args.concurrency, &worker_env)?;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut progress = (0, Instant::now());
    let elapsed = loop {
        tick.tick().await;
        let backlog = soak_db::backlog(&mut conn, QUEUE)
            .await
            .context("counting the backlog")?;
        let processed = processed(enqueued, backlog);
        if processed >= args.n {
            break started.elapsed();
        }
        if enqueued < args.n && (backlog.pending as u64) < args.backlog {
            let target = (enqueued + args.backlog - backlog.pending as u64).min(args.n);
            enqueue_up_to(harness, &mut enqueued, target, MAX_BATCHES_PER_TICK).await?;
        }
        if sampler.due(processed) {
            sampler.take(&mut conn, enqueued).await?;
        }
        worker.check_alive()?;
        if processed > progress.0 {
            progress = (processed, Instant::now());
        } else if progress.1.elapsed() > STALL_TIMEOUT {
            bail!(
                "soak: no run finished for {} s ({processed} of {} done)",
                STALL_TIMEOUT.as_secs(),
                args.n
            );
        }
    };

    // Every run is finished; give the pruner its retention and a pass or two
    // to delete the last ones, then take the final sample.
    let waited = Instant::now();
    while waited.elapsed() < PRUNE_WAIT {
        if runq_devtools::bench_db::runs_count(&mut conn, QUEUE)
            .await
            .context("counting runs left")?
            == 0
        {
            break;
        }
        worker.check_alive()?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    sampler.take(&mut conn, enqueued).await?;
    drop(conn);
    worker.stop().await?;
    harness.reset().await?;

    let samples = sampler.samples;
    let summary = soak_report::summarise(
        &samples,
        soak_report::Context {
            jobs: args.n,
            ms: whole_ms(elapsed),
            jobs_per_s: per_second(args.n, elapsed),
            concurrency: args.concurrency,
            backlog: args.backlog,
            claim_limit: CLAIM_LIMIT,
            worker_env: worker_env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            server,
            reloptions,
        },
    );
    harness.progress.log(format_args!(
        "soak: {} runs in {:.1} s ({}/s); claim ms first quartile {:?}, last {:?} (x{:?})",
        args.n,
        elapsed.as_secs_f64(),
        summary.context.jobs_per_s,
        summary.claim_ms_first_quartile,
        summary.claim_ms_last_quartile,
        summary.claim_ratio,
    ));
    Ok(SoakOutcome { samples, summary })
}

/// The soak's worker variables not already set in this environment.
fn worker_env() -> Vec<(String, String)> {
    WORKER_ENV
        .iter()
        .filter(|(name, _)| std::env::var_os(name).is_none())
        .map(|&(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

/// Runs finished: every run enqueued that is neither pending nor running.
fn processed(enqueued: u64, backlog: soak_db::Backlog) -> u64 {
    let unfinished = u64::try_from(backlog.pending + backlog.running).unwrap_or(0);
    enqueued.saturating_sub(unfinished)
}

/// Enqueues runs numbered from `*enqueued` until `target`, in batches of
/// [`BATCH`], at most `max_batches` of them.
async fn enqueue_up_to(
    harness: &Harness,
    enqueued: &mut u64,
    target: u64,
    max_batches: u64,
) -> anyhow::Result<()> {
    let mut batches = 0;
    while *enqueued < target && batches < max_batches {
        let end = (*enqueued + BATCH as u64).min(target);
        *enqueued +=
            enqueue::library_batch(&harness.pool, &[harness.tenant], *enqueued..end).await?;
        batches += 1;
    }
    Ok(())
}

/// Takes the samples: when one is due, and what goes in it.
struct Sampler<'a> {
    pool: &'a PgPool,
    started: Instant,
    /// Runs between two samples.
    every: u64,
    samples: Vec<Sample>,
    last: (u64, Instant),
}

impl<'a> Sampler<'a> {
    fn new(pool: &'a PgPool, started: Instant, n: u64) -> Self {
        Self {
            pool,
            started,
            every: (n / SAMPLES).max(1),
            samples: Vec::new(),
            last: (0, started),
        }
    }

    fn due(&self, processed: u64) -> bool {
        processed >= self.last.0 + self.every || self.last.1.elapsed() >= MAX_SAMPLE_GAP
    }

    async fn take(&mut self, conn: &mut sqlx::PgConnection, enqueued: u64) -> anyhow::Result<()> {
        let (claim_ms, claim_rows) = claim_probe(self.pool).await?;
        let backlog = soak_db::backlog(conn, QUEUE)
            .await
            .context("counting the backlog")?;
        let stats = soak_db::table_stats(conn, &HOT_TABLES)
            .await
            .context("reading table sizes")?;
        let indexes = soak_db::index_sizes(conn, "runs")
            .await
            .context("reading the sizes of the indexes of runs")?;
        let now = Instant::now();
        let processed = processed(enqueued, backlog);
        let since = now.duration_since(self.last.1);
        let sample = Sample {
            t_s: round3(now.duration_since(self.started).as_secs_f64()),
            processed,
            enqueued,
            pending: backlog.pending,
            running: backlog.running,
            runs_per_s: per_second(processed.saturating_sub(self.last.0), since),
            claim_ms,
            claim_rows,
            tables: stats
                .iter()
                .map(|t| (t.name.clone(), TableSample::from(t)))
                .collect(),
            runs_indexes: indexes.into_iter().collect(),
        };
        log_sample(&sample);
        self.samples.push(sample);
        self.last = (processed, now);
        Ok(())
    }
}

/// One line per sample on stderr.
fn log_sample(sample: &Sample) {
    let runs = sample.tables.get("runs");
    let indexes: Vec<String> = sample
        .runs_indexes
        .iter()
        .map(|(name, bytes)| format!("{name}={}k", bytes / 1024))
        .collect();
    let others: Vec<String> = sample
        .tables
        .iter()
        .filter(|(name, _)| name.as_str() != "runs")
        .map(|(name, t)| format!("{name}={}k/dead {}", t.total_bytes / 1024, t.dead))
        .collect();
    eprintln!(
        "soak t={:.0}s done={} pending={} {}/s claim={:.2}ms({}) runs={}k heap={}k dead={} av={} [{}] [{}]",
        sample.t_s,
        sample.processed,
        sample.pending,
        sample.runs_per_s,
        sample.claim_ms,
        sample.claim_rows,
        runs.map_or(0, |t| t.total_bytes / 1024),
        runs.map_or(0, |t| t.heap_bytes / 1024),
        runs.map_or(0, |t| t.dead),
        runs.map_or(0, |t| t.autovacuums),
        indexes.join(" "),
        others.join(" "),
    );
}

/// The median time of [`CLAIM_PROBES`] real claims of up to [`CLAIM_LIMIT`]
/// bench runs, each in a transaction rolled back (the runs stay pending, the
/// worker skips them for that moment), and how many runs the last one found.
/// The time is the statement as the worker issues it, round trips included.
async fn claim_probe(pool: &PgPool) -> anyhow::Result<(f64, usize)> {
    let worker = uuid::Uuid::now_v7();
    let queues = [QUEUE.to_owned()];
    let mut times = Vec::with_capacity(CLAIM_PROBES);
    let mut rows = 0;
    for _ in 0..CLAIM_PROBES {
        let mut tx = pool.begin().await.context("beginning a probe claim")?;
        let started = Instant::now();
        let claimed = db::runs::claim(&mut tx, worker, &queues, CLAIM_LIMIT, 30_000)
            .await
            .context("probe claim")?;
        times.push(started.elapsed().as_secs_f64() * 1_000.0);
        rows = claimed.len();
        tx.rollback().await.context("rolling back a probe claim")?;
    }
    times.sort_by(f64::total_cmp);
    Ok((round3(times[times.len() / 2]), rows))
}
