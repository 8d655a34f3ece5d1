//! The latency phase: an idle worker, then runs sent one at a time on a fixed
//! schedule (open loop: a slow answer delays no later send), and for each run
//! the time from just before its request was sent until a worker claimed it.
//! Then the same under load: one worker drains a backlog of the bench queue
//! while probe runs are sent to a second queue it also serves, and each
//! probe's time to start is measured the same way.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use runq_devtools::bench_db;
use runq_shared::RunId;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::clock::DbClock;
use super::drain;
use super::enqueue::ApiClient;
use super::harness::Harness;
use super::progress::Bar;
use super::worker::WorkerProcess;
use super::{PROBE_QUEUE, QUEUE};

/// Slots of the idle worker.
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
/// Slots of the worker under load: the drain concurrency compare.sh uses.
const LOADED_CONCURRENCY: usize = 50;
/// Probes sent under load at most; sending stops early when the backlog is
/// drained first.
const PROBES: u64 = 200;

/// Latency figures, milliseconds from send to `started_at`.
#[derive(Serialize, Debug)]
pub struct LatencyReport {
    concurrency: usize,
    gap_ms: u64,
    /// Mean time between two sends as they happened.
    achieved_gap_ms: f64,
    n: u64,
    #[serde(flatten)]
    figures: Figures,
}

/// Latency of runs sent to a second queue while the worker drains a
/// backlog of the bench queue.
#[derive(Serialize, Debug)]
pub struct LoadedLatencyReport {
    /// The worker's slots, shared by both queues.
    concurrency: usize,
    /// Runs queued on the bench queue before the worker started.
    backlog: u64,
    /// Probes measured: those sent while the backlog was still draining.
    n: u64,
    gap_ms: u64,
    /// Absent when no probe was sent before the backlog was drained.
    #[serde(flatten)]
    figures: Option<Figures>,
}

/// Percentiles, maximum and mean of some latencies, in milliseconds to
/// 0.1 ms.
#[derive(Serialize, Debug, PartialEq)]
struct Figures {
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    mean_ms: f64,
}

impl Figures {
    /// The figures of `latencies` (ms, any order); `None` when empty.
    fn of(mut latencies: Vec<f64>) -> Option<Self> {
        latencies.sort_unstable_by(f64::total_cmp);
        let max = *latencies.last()?;
        let mean = latencies.iter().sum::<f64>() / latencies.len() as f64;
        Some(Self {
            p50_ms: round(percentile(&latencies, 0.50), 10.0),
            p95_ms: round(percentile(&latencies, 0.95), 10.0),
            p99_ms: round(percentile(&latencies, 0.99), 10.0),
            max_ms: round(max, 10.0),
            mean_ms: round(mean, 10.0),
        })
    }
}

/// Measures enqueue-to-start latency through the API, with an idle worker.
///
/// # Errors
///
/// A request fails, or the worker exits or does not start every run in time.
pub async fn run(harness: &Harness) -> anyhow::Result<LatencyReport> {
    harness.reset().await?;
    let api = ApiClient::new(harness);
    let mut worker = harness.spawn_worker(CONCURRENCY)?;
    worker.registered(&harness.pool).await?;
    // The idle measurement sends every run it plans.
    let never = CancellationToken::new();

    let bar = harness.progress.bar("latency: warm-up", WARM_UP);
    let warm_up = send_open_loop(&api, 0..WARM_UP, Some(&bar), &never).await?;
    wait_succeeded(harness, &mut worker, QUEUE, warm_up.len() as u64).await?;
    bar.finish();
    tokio::time::sleep(PAUSE).await;

    let clock = DbClock::read(&harness.pool).await?;
    let bar = harness.progress.bar("latency", RUNS);
    let sent = send_open_loop(&api, WARM_UP..WARM_UP + RUNS, Some(&bar), &never).await?;
    bar.finish();
    wait_succeeded(harness, &mut worker, QUEUE, WARM_UP + RUNS).await?;
    worker.stop().await?;
    let latencies = latencies(harness, &clock, &sent).await?;
    harness.reset().await?;

    let mut send_times: Vec<Instant> = sent.iter().map(|(_, at)| *at).collect();
    send_times.sort_unstable();
    let achieved_gap_ms = match (send_times.first(), send_times.last()) {
        (Some(first), Some(last)) if send_times.len() > 1 => {
            last.duration_since(*first).as_secs_f64() * 1_000.0 / (send_times.len() - 1) as f64
        }
        _ => 0.0,
    };
    Ok(LatencyReport {
        concurrency: CONCURRENCY,
        gap_ms: GAP.as_millis() as u64,
        achieved_gap_ms: round(achieved_gap_ms, 100.0),
        n: RUNS,
        figures: Figures::of(latencies).context("latency: no run was measured")?,
    })
}

/// Measures enqueue-to-start latency under load: `backlog` runs queued on
/// the bench queue, one worker with [`LOADED_CONCURRENCY`] slots serving
/// both it and [`PROBE_QUEUE`], and, from when the worker has registered,
/// up to [`PROBES`] probe runs sent through the API to the probe queue
/// [`GAP`] apart (open loop). Only probes sent while the backlog was still
/// draining are measured.
///
/// # Errors
///
/// A request fails, or the worker exits, stalls, or does not start every
/// probe in time.
pub async fn under_load(harness: &Harness, backlog: u64) -> anyhow::Result<LoadedLatencyReport> {
    const WHAT: &str = "latency under load";
    harness.reset().await?;
    drain::backlog(harness, backlog, &[harness.tenant], WHAT).await?;
    let api = ApiClient::new(harness).on_queue(PROBE_QUEUE);
    let mut conn = harness.pool.acquire().await.context("connecting")?;
    let clock = DbClock::read(&harness.pool).await?;
    let mut worker = harness.spawn_worker_with(&[QUEUE, PROBE_QUEUE], LOADED_CONCURRENCY, &[])?;
    // Its start-up is the drain's figure, not this one's: the first probe
    // goes once it is about to claim.
    worker.registered(&harness.pool).await?;

    let bar = harness.progress.bar(WHAT, backlog);
    let drained_signal = CancellationToken::new();
    let watching = async {
        let drained = drain::watch(&mut conn, &mut worker, backlog, bar, WHAT).await;
        drained_signal.cancel();
        drained
    };
    let sending = send_open_loop(&api, 0..PROBES, None, &drained_signal);
    let (drained, sent) = tokio::try_join!(watching, sending)?;
    drop(conn);
    let measured = sent_before(&sent, drained.last_busy_at);
    wait_succeeded(harness, &mut worker, PROBE_QUEUE, sent.len() as u64).await?;
    worker.stop().await?;
    let latencies = latencies(harness, &clock, &measured).await?;
    harness.reset().await?;
    Ok(LoadedLatencyReport {
        concurrency: LOADED_CONCURRENCY,
        backlog,
        n: measured.len() as u64,
        gap_ms: GAP.as_millis() as u64,
        figures: Figures::of(latencies),
    })
}

/// The sends of `sent` made at or before `until` (none when `until` is
/// `None`).
fn sent_before<T: Copy>(sent: &[(T, Instant)], until: Option<Instant>) -> Vec<(T, Instant)> {
    let Some(until) = until else {
        return Vec::new();
    };
    sent.iter()
        .filter(|(_, sent_at)| *sent_at <= until)
        .copied()
        .collect()
}

/// Each run's latency in milliseconds: its `started_at` (database clock)
/// minus the instant just before its request was sent, aligned by `clock`.
///
/// # Errors
///
/// Database errors, or a run that has not started.
async fn latencies(
    harness: &Harness,
    clock: &DbClock,
    sent: &[(RunId, Instant)],
) -> anyhow::Result<Vec<f64>> {
    let ids: Vec<RunId> = sent.iter().map(|(id, _)| *id).collect();
    let mut conn = harness.pool.acquire().await.context("connecting")?;
    let started: HashMap<RunId, _> = bench_db::runs_started_at(&mut conn, &ids)
        .await
        .context("reading when the runs started")?
        .into_iter()
        .collect();
    sent.iter()
        .map(|(id, sent_at)| match started.get(id) {
            Some(Some(started_at)) => Ok(clock.ms_from(*sent_at, *started_at)),
            _ => bail!("run {id} succeeded but has no start time"),
        })
        .collect()
}

/// Sends runs numbered `runs` through the API, [`GAP`] apart by absolute
/// schedule: each request is its own task, started at its slot whether or not
/// earlier ones were answered. No send starts once `stop` is cancelled.
/// Returns each created run with the instant just before its request was
/// sent, counting them into `bar` if given.
async fn send_open_loop(
    api: &ApiClient,
    runs: std::ops::Range<u64>,
    bar: Option<&Bar>,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<(RunId, Instant)>> {
    let mut tasks = JoinSet::new();
    let start = tokio::time::Instant::now() + GAP;
    for (slot, i) in runs.enumerate() {
        // Both futures are cancel safe: the loser is dropped and nothing is lost.
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(start + GAP * slot as u32) => {}
        }
        let api = api.clone();
        let counter = bar.map(Bar::counter);
        tasks.spawn(async move {
            // Serialising the body is the client's work, before the send.
            let request = api.run_request(i)?;
            let sent_at = Instant::now();
            let run = api.create_run(request).await?;
            if let Some(counter) = counter {
                counter.add(1);
            }
            anyhow::Ok((run.id, sent_at))
        });
    }
    let mut sent = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        sent.push(joined.context("a send task panicked")??);
    }
    Ok(sent)
}

/// Waits until `count` runs of `queue` have succeeded.
async fn wait_succeeded(
    harness: &Harness,
    worker: &mut WorkerProcess,
    queue: &str,
    count: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + FINISH_TIMEOUT;
    let mut conn = harness.pool.acquire().await.context("connecting")?;
    loop {
        let succeeded = bench_db::runs_succeeded_count(&mut conn, queue)
            .await
            .context("counting succeeded runs")?;
        if u64::try_from(succeeded).unwrap_or(0) >= count {
            return Ok(());
        }
        worker.check_alive()?;
        if Instant::now() >= deadline {
            bail!(
                "latency: {succeeded} of {count} runs of queue '{queue}' succeeded within {} s",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_the_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 0.50), 50.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
        assert_eq!(percentile(&sorted, 1.0), 100.0);
        assert_eq!(percentile(&sorted, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn figures_sort_their_latencies_and_round_to_a_tenth() {
        let figures = Figures::of(vec![3.04, 1.0, 2.0, 10.0]).expect("four latencies");
        assert_eq!(
            figures,
            Figures {
                p50_ms: 2.0,
                p95_ms: 10.0,
                p99_ms: 10.0,
                max_ms: 10.0,
                mean_ms: 4.0,
            }
        );
        assert_eq!(Figures::of(Vec::new()), None);
    }

    #[test]
    fn only_probes_sent_while_the_backlog_drained_are_measured() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let sent = [(1, at(0)), (3, at(10)), (2, at(5)), (4, at(15))];
        assert_eq!(
            sent_before(&sent, Some(at(10))),
            vec![(1, at(0)), (3, at(10)), (2, at(5))]
        );
        assert_eq!(sent_before(&sent, None), Vec::new());
    }

    #[test]
    fn an_empty_loaded_report_has_no_figures() {
        let report = LoadedLatencyReport {
            concurrency: 50,
            backlog: 10,
            n: 0,
            gap_ms: 5,
            figures: None,
        };
        assert_eq!(
            serde_json::to_string(&report).expect("serialisable"),
            r#"{"concurrency":50,"backlog":10,"n":0,"gap_ms":5}"#
        );
    }
}
