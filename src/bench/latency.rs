//! The latency phase: an idle worker, then runs sent one at a time on a fixed
//! schedule (open loop: a slow answer delays no later send), and for each run
//! the time from just before its request was sent until a worker claimed it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use runq_devtools::bench_db;
use runq_shared::RunId;
use serde::Serialize;
use tokio::task::JoinSet;

use super::clock::DbClock;
use super::enqueue::ApiClient;
use super::harness::Harness;
use super::QUEUE;

/// Slots of the worker.
const CONCURRENCY: usize = 10;
/// Runs sent before measuring, to warm connections, caches and the worker.
const WARM_UP: u64 = 20;
/// Pause between the warm-up and the measured runs.
const PAUSE: Duration = Duration::from_secs(1);
/// Measured runs.
const RUNS: u64 = 500;
/// Scheduled time between two sends.
const GAP: Duration = Duration::from_millis(5);
/// How long the worker gets to start every sent run.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// Latency figures, milliseconds from send to `started_at`.
#[derive(Serialize, Debug)]
pub struct LatencyReport {
    concurrency: usize,
    gap_ms: u64,
    /// Mean time between two sends as they happened.
    achieved_gap_ms: f64,
    n: u64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    mean_ms: f64,
}

/// Measures enqueue-to-start latency through the API.
///
/// # Errors
///
/// A request fails, or the worker exits or does not start every run in time.
pub async fn run(harness: &Harness) -> anyhow::Result<LatencyReport> {
    harness.reset().await?;
    let api = ApiClient::new(harness);
    let mut worker = harness.spawn_worker(CONCURRENCY)?;
    worker.registered(&harness.pool).await?;

    let bar = harness.progress.bar("latency: warm-up", WARM_UP);
    let warm_up = send_open_loop(&api, 0..WARM_UP, &bar).await?;
    wait_succeeded(harness, &mut worker, warm_up.len() as u64).await?;
    bar.finish();
    tokio::time::sleep(PAUSE).await;

    let clock = DbClock::read(&harness.pool).await?;
    let bar = harness.progress.bar("latency", RUNS);
    let sent = send_open_loop(&api, WARM_UP..WARM_UP + RUNS, &bar).await?;
    bar.finish();
    wait_succeeded(harness, &mut worker, WARM_UP + RUNS).await?;
    worker.stop().await?;

    let ids: Vec<RunId> = sent.iter().map(|(id, _)| *id).collect();
    let mut conn = harness.pool.acquire().await.context("connecting")?;
    let started: HashMap<RunId, _> = bench_db::runs_started_at(&mut conn, &ids)
        .await
        .context("reading when the runs started")?
        .into_iter()
        .collect();
    drop(conn);
    let mut latencies = Vec::with_capacity(sent.len());
    for (id, sent_at) in &sent {
        let Some(Some(started_at)) = started.get(id) else {
            bail!("run {id} succeeded but has no start time");
        };
        latencies.push(clock.ms_from(*sent_at, *started_at));
    }
    harness.reset().await?;

    let mut send_times: Vec<Instant> = sent.iter().map(|(_, at)| *at).collect();
    send_times.sort_unstable();
    let achieved_gap_ms = match (send_times.first(), send_times.last()) {
        (Some(first), Some(last)) if send_times.len() > 1 => {
            last.duration_since(*first).as_secs_f64() * 1_000.0 / (send_times.len() - 1) as f64
        }
        _ => 0.0,
    };
    latencies.sort_unstable_by(f64::total_cmp);
    let mean = latencies.iter().sum::<f64>() / latencies.len().max(1) as f64;
    Ok(LatencyReport {
        concurrency: CONCURRENCY,
        gap_ms: GAP.as_millis() as u64,
        achieved_gap_ms: round(achieved_gap_ms, 100.0),
        n: RUNS,
        p50_ms: round(percentile(&latencies, 0.50), 10.0),
        p95_ms: round(percentile(&latencies, 0.95), 10.0),
        p99_ms: round(percentile(&latencies, 0.99), 10.0),
        max_ms: round(latencies.last().copied().unwrap_or(0.0), 10.0),
        mean_ms: round(mean, 10.0),
    })
}

/// Sends runs numbered `runs` through the API, [`GAP`] apart by absolute
/// schedule: each request is its own task, started at its slot whether or not
/// earlier ones were answered. Returns each created run with the instant just
/// before its request was sent.
async fn send_open_loop(
    api: &ApiClient,
    runs: std::ops::Range<u64>,
    bar: &super::progress::Bar,
) -> anyhow::Result<Vec<(RunId, Instant)>> {
    let mut tasks = JoinSet::new();
    let start = tokio::time::Instant::now() + GAP;
    for (slot, i) in runs.enumerate() {
        tokio::time::sleep_until(start + GAP * slot as u32).await;
        let api = api.clone();
        let counter = bar.counter();
        tasks.spawn(async move {
            // Serialising the body is the client's work, before the send.
            let request = api.run_request(i)?;
            let sent_at = Instant::now();
            let run = api.create_run(request).await?;
            counter.add(1);
            anyhow::Ok((run.id, sent_at))
        });
    }
    let mut sent = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        sent.push(joined.context("a send task panicked")??);
    }
    Ok(sent)
}

/// Waits until `count` runs of the queue have succeeded.
async fn wait_succeeded(
    harness: &Harness,
    worker: &mut super::worker::WorkerProcess,
    count: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + FINISH_TIMEOUT;
    let mut conn = harness.pool.acquire().await.context("connecting")?;
    loop {
        let succeeded = bench_db::runs_succeeded_count(&mut conn, QUEUE)
            .await
            .context("counting succeeded runs")?;
        if u64::try_from(succeeded).unwrap_or(0) >= count {
            return Ok(());
        }
        worker.check_alive()?;
        if Instant::now() >= deadline {
            bail!(
                "latency: {succeeded} of {count} runs succeeded within {} s",
                FINISH_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The nearest-rank percentile `q` (0..=1) of ascending `sorted`.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `value` rounded to `1 / scale`.
fn round(value: f64, scale: f64) -> f64 {
    (value * scale).round() / scale
}
