//! `runq bench`: the load tool of BENCH.md. It measures enqueue throughput
//! (through the REST API and through the library), drain throughput of one
//! worker process, and enqueue-to-start latency, and prints them as one JSON
//! line on stdout. Progress goes to stderr, and only to a terminal. The
//! `soak` phase, never run by default, pushes many runs through with pruning
//! on and samples claim latency and table sizes (README, "Bloat under
//! churn"); its samples go to stderr whether or not it is a terminal.
//!
//! The API is a `runq api` process on a loopback port, driven by a real HTTP
//! client, and workers are `runq worker` processes, both started from this
//! same executable as users run them, so each one's memory is its own. Every
//! phase starts from empty run tables, so the tool refuses a database holding
//! runs of other queues.

mod api;
mod clock;
mod drain;
mod enqueue;
mod flow;
mod harness;
mod latency;
mod process;
mod progress;
mod soak;
mod soak_report;
mod worker;

use std::time::Duration;

use anyhow::{bail, Context};
use clap::ValueEnum;
use runq_devtools::bench_db;
use runq_shared::config::DatabaseArgs;
use serde::Serialize;

use self::harness::Harness;
use self::progress::Progress;

/// The queue every bench run goes to, but the probes.
const QUEUE: &str = "bench";
/// The queue of the probe runs the latency phase sends while a backlog of
/// [`QUEUE`] drains.
const PROBE_QUEUE: &str = "bench_probe";
/// Runs in one batch call or one `enqueue_many` transaction.
const BATCH: usize = 1_000;
/// Requests or library calls in flight in the `*_parallel` measurements.
const PARALLEL: usize = 10;

const DEFAULT_PHASES: [Phase; 3] = [Phase::Enqueue, Phase::Drain, Phase::Latency];
const DEFAULT_N: u64 = 20_000;
const DEFAULT_N_SINGLE: u64 = 5_000;
const DEFAULT_CONCURRENCY: [usize; 2] = [10, 50];
const DEFAULT_MAX_CONNECTIONS: u32 = 16;
const DEFAULT_ACQUIRE_TIMEOUT_MS: u64 = 3_000;
const DEFAULT_SOAK_BACKLOG: u64 = 20_000;
const DEFAULT_SOAK_CONCURRENCY: usize = 50;

/// `runq bench` settings. Anything not at its default is named in the
/// output's `settings`, so figures are only compared like with like.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The database (its pool settings also apply to the API and the
    /// workers). Without a URL, database `runq_bench` on a local server or on
    /// a throwaway cluster is used, as `runq dev` picks one.
    #[command(flatten)]
    database: DatabaseArgs,
    /// Phases to run, comma separated; they always run in this order.
    #[arg(
        long,
        env = "RUNQ_BENCH_PHASES",
        value_enum,
        value_delimiter = ',',
        default_value = "enqueue,drain,latency"
    )]
    phases: Vec<Phase>,
    /// Runs in the bulk enqueue, in each drain and in the backlog of the
    /// latency under load.
    #[arg(long, env = "RUNQ_BENCH_N", default_value_t = DEFAULT_N)]
    n: u64,
    /// Runs in the one-at-a-time enqueue measurements.
    #[arg(long, env = "RUNQ_BENCH_N_SINGLE", default_value_t = DEFAULT_N_SINGLE)]
    n_single: u64,
    /// Worker concurrency of each drain, comma separated: one drain per value.
    #[arg(
        long,
        env = "RUNQ_BENCH_CONCURRENCY",
        value_delimiter = ',',
        default_value = "10,50"
    )]
    concurrency: Vec<usize>,
    /// Pending runs the soak phase keeps queued while its worker drains.
    #[arg(long, env = "RUNQ_BENCH_SOAK_BACKLOG", default_value_t = DEFAULT_SOAK_BACKLOG)]
    soak_backlog: u64,
    /// Worker concurrency of the soak phase.
    #[arg(long, env = "RUNQ_BENCH_SOAK_CONCURRENCY", default_value_t = DEFAULT_SOAK_CONCURRENCY)]
    soak_concurrency: usize,
    /// A name for this configuration, printed as `preset`.
    #[arg(long, env = "RUNQ_BENCH_PRESET", default_value = "default")]
    preset: String,
    /// Spread the drain's runs over this many tenants, round robin, so every
    /// claim shares its batch out between them (fairness at work).
    #[arg(long, env = "RUNQ_BENCH_TENANTS", default_value_t = 1)]
    tenants: usize,
    /// Give the bench queue this fleet-wide concurrency limit during the
    /// drain, so every claim takes the limited path (set it at or above the
    /// drain's concurrency to measure the path, not the limit).
    #[arg(long, env = "RUNQ_BENCH_QUEUE_CONCURRENCY")]
    queue_concurrency: Option<i32>,
    /// Let the worker and API processes log to this stderr (they are silent
    /// otherwise).
    #[arg(long, env = "RUNQ_BENCH_WORKER_LOGS")]
    worker_logs: bool,
}

/// One phase of the benchmark.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Enqueue throughput: one at a time, ten in flight, and in batches.
    Enqueue,
    /// Drain throughput of one worker process per concurrency.
    Drain,
    /// Enqueue-to-start latency under a steady open-loop trickle, to an
    /// idle worker and to one draining `--n` runs of another queue.
    Latency,
    /// `--n` runs through enqueue, claim, completion and pruning, sampling
    /// claim latency and table sizes (not run unless named).
    Soak,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Enqueue => "enqueue",
            Phase::Drain => "drain",
            Phase::Latency => "latency",
            Phase::Soak => "soak",
        }
    }
}

/// The JSON line, in BENCH.md's shape. A phase not run is `null`.
#[derive(Serialize, Debug)]
struct Report {
    lib: &'static str,
    version: &'static str,
    preset: String,
    settings: String,
    n: u64,
    enqueue: Option<enqueue::EnqueueReport>,
    drain: Option<Vec<drain::DrainReport>>,
    latency: Option<latency::LatencyReport>,
    /// Latency of runs on another queue while `n` runs drain (the latency
    /// phase measures it after the idle latency).
    latency_under_load: Option<latency::LoadedLatencyReport>,
    /// The soak's samples; absent unless the soak ran, so the default
    /// report keeps BENCH.md's shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    soak: Option<Vec<soak_report::Sample>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    soak_summary: Option<soak_report::Summary>,
}

/// Runs the phases in `args` and prints the report line.
///
/// # Errors
///
/// Bad settings, an unreachable database, a database holding runs of other
/// queues, an API call or a worker failing: every figure printed must come
/// from a complete, checked phase, so any failure ends the benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    validate(&args)?;
    let settings = settings(&args);
    let progress = Progress::new();
    let picked = runq_devtools::postgres::pick_database(
        args.database.url.as_deref(),
        "runq_bench",
        &runq_devtools::postgres::ThrowawayArgs::default(),
    )
    .await
    .context("finding a database")?;
    progress.note(format_args!(
        "database: {} ({})",
        crate::redact(&picked.url),
        picked.source
    ));

    let harness = Harness::start(
        &picked.url,
        &args.database,
        args.worker_logs,
        progress.clone(),
    )
    .await?;
    let wanted = |phase: Phase| args.phases.contains(&phase);
    let phases = async {
        let enqueue = if wanted(Phase::Enqueue) {
            Some(enqueue::run(&harness, args.n, args.n_single).await?)
        } else {
            None
        };
        let drain = if wanted(Phase::Drain) {
            let flow = flow::Flow {
                tenants: args.tenants,
                queue_concurrency: args.queue_concurrency,
            };
            Some(drain::run(&harness, args.n, &args.concurrency, flow).await?)
        } else {
            None
        };
        let (latency, latency_under_load) = if wanted(Phase::Latency) {
            let idle = latency::run(&harness).await?;
            let loaded = latency::under_load(&harness, args.n).await?;
            (Some(idle), Some(loaded))
        } else {
            (None, None)
        };
        let soak = if wanted(Phase::Soak) {
            let soak = soak::SoakArgs {
                n: args.n,
                backlog: args.soak_backlog,
                concurrency: args.soak_concurrency,
            };
            Some(soak::run(&harness, soak).await?)
        } else {
            None
        };
        anyhow::Ok((enqueue, drain, latency, latency_under_load, soak))
    };
    // On SIGINT or SIGTERM the phases are dropped, which kills any worker
    // process they started; the default action would leave it running.
    let outcome = tokio::select! {
        outcome = phases => outcome,
        signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}")),
    };
    // Leave the tables empty whatever happened, then stop the API.
    let cleaned = harness.reset().await;
    harness.shutdown().await?;
    let (enqueue, drain, latency, latency_under_load, soak) = outcome?;
    let (soak, soak_summary) = match soak {
        Some(soak) => (Some(soak.samples), Some(soak.summary)),
        None => (None, None),
    };
    cleaned?;
    drop(picked);

    let report = Report {
        lib: "runq",
        version: env!("CARGO_PKG_VERSION"),
        preset: args.preset,
        settings,
        n: args.n,
        enqueue,
        drain,
        latency,
        latency_under_load,
        soak,
        soak_summary,
    };
    let line = serde_json::to_string(&report).context("serialising the report")?;
    println!("{line}");
    Ok(())
}

/// Resolves with the name of the first SIGINT or SIGTERM received.
///
/// # Cancel safety
///
/// Cancel safe: dropping it only stops listening.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            // Without a handler SIGTERM keeps its default action.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = terminate => "SIGTERM",
        _ = interrupt => "SIGINT",
    }
}

fn validate(args: &BenchArgs) -> anyhow::Result<()> {
    if args.n == 0 {
        bail!("--n 0: at least one run is needed");
    }
    if args.n_single == 0 {
        bail!("--n-single 0: at least one run is needed");
    }
    if args.phases.is_empty() {
        bail!("--phases is empty: name at least one of enqueue, drain, latency, soak");
    }
    if args.concurrency.is_empty() && args.phases.contains(&Phase::Drain) {
        bail!("--concurrency is empty: the drain phase needs at least one value");
    }
    if let Some(zero) = args.concurrency.iter().find(|&&c| c == 0) {
        bail!("--concurrency {zero}: a worker needs at least one slot");
    }
    if args.soak_concurrency == 0 && args.phases.contains(&Phase::Soak) {
        bail!("--soak-concurrency 0: a worker needs at least one slot");
    }
    if args.soak_backlog == 0 && args.phases.contains(&Phase::Soak) {
        bail!("--soak-backlog 0: the soak needs runs queued");
    }
    if args.database.max_connections == 0 {
        bail!("--db-max-connections 0: the API and the workers need a connection");
    }
    if args.tenants == 0 {
        bail!("--tenants 0: the runs need at least one tenant");
    }
    if let Some(limit) = args.queue_concurrency.filter(|&limit| limit < 1) {
        bail!("--queue-concurrency {limit}: a limit of at least 1 is needed");
    }
    Ok(())
}

/// Every knob not at its default, as `key=value` words separated by spaces;
/// empty when the run is the standard one. Includes `RUNQ_*` variables the
/// worker and API processes inherit, since they change how those behave.
fn settings(args: &BenchArgs) -> String {
    let mut knobs = Vec::new();
    if args.phases != DEFAULT_PHASES {
        let names: Vec<&str> = args.phases.iter().map(|p| p.name()).collect();
        knobs.push(format!("phases={}", names.join(",")));
    }
    if args.n != DEFAULT_N {
        knobs.push(format!("n={}", args.n));
    }
    if args.n_single != DEFAULT_N_SINGLE {
        knobs.push(format!("n-single={}", args.n_single));
    }
    if args.concurrency != DEFAULT_CONCURRENCY {
        let values: Vec<String> = args.concurrency.iter().map(usize::to_string).collect();
        knobs.push(format!("concurrency={}", values.join(",")));
    }
    if args.database.max_connections != DEFAULT_MAX_CONNECTIONS {
        knobs.push(format!(
            "db-max-connections={}",
            args.database.max_connections
        ));
    }
    if args.database.acquire_timeout_ms != DEFAULT_ACQUIRE_TIMEOUT_MS {
        knobs.push(format!(
            "db-acquire-timeout-ms={}",
            args.database.acquire_timeout_ms
        ));
    }
    if args.soak_backlog != DEFAULT_SOAK_BACKLOG {
        knobs.push(format!("soak-backlog={}", args.soak_backlog));
    }
    if args.soak_concurrency != DEFAULT_SOAK_CONCURRENCY {
        knobs.push(format!("soak-concurrency={}", args.soak_concurrency));
    }
    if args.worker_logs {
        knobs.push("worker-logs".to_owned());
    }
    if args.tenants != 1 {
        knobs.push(format!("tenants={}", args.tenants));
    }
    if let Some(limit) = args.queue_concurrency {
        knobs.push(format!("queue-concurrency={limit}"));
    }
    let mut inherited: Vec<String> = std::env::vars()
        .filter(|(name, _)| process::inherits(name))
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    inherited.sort();
    knobs.extend(inherited);
    knobs.join(" ")
}

/// Milliseconds in `elapsed`, rounded to whole milliseconds.
fn whole_ms(elapsed: Duration) -> u64 {
    (elapsed.as_secs_f64() * 1_000.0).round() as u64
}

/// Jobs per second over `elapsed`, rounded.
fn per_second(jobs: u64, elapsed: Duration) -> u64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        (jobs as f64 / seconds).round() as u64
    } else {
        0
    }
}

/// Fails unless `queue` holds exactly `expected` runs: a measurement only
/// counts if every run it timed was really inserted.
async fn check_count(harness: &Harness, expected: u64, what: &str) -> anyhow::Result<()> {
    let mut conn = harness.pool.acquire().await.context("connecting")?;
    let count = bench_db::runs_count(&mut conn, QUEUE)
        .await
        .context("counting runs")?;
    if u64::try_from(count).ok() != Some(expected) {
        bail!("{what}: expected {expected} runs in queue '{QUEUE}', found {count}");
    }
    Ok(())
}
