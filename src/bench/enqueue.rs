//! The enqueue phase: how fast runs get in, one at a time, ten in flight and
//! in batches of 1,000, through the REST API and through the library.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use reqwest::header::AUTHORIZATION;
use reqwest::StatusCode;
use runq_shared::{db, CreateRuns, CreatedRuns, Run, TenantId};
use serde::Serialize;
use sqlx::PgPool;
use tokio::task::JoinSet;

use super::harness::{bench_new_run, bench_run, bench_run_on, Harness};
use super::process::megabytes;
use super::{check_count, per_second, whole_ms, BATCH, PARALLEL, QUEUE};

/// One enqueue measurement.
#[derive(Serialize, Debug)]
pub struct Throughput {
    /// What was called, and how.
    api: &'static str,
    /// Runs inserted.
    jobs: u64,
    /// Wall time from the first call to the last answer.
    ms: u64,
    /// `jobs` over that time.
    jobs_per_s: u64,
}

/// The bulk enqueue through the API, with the API process's memory.
#[derive(Serialize, Debug)]
pub struct BulkThroughput {
    #[serde(flatten)]
    throughput: Throughput,
    /// The API process's peak resident set read right after the bulk
    /// enqueue, in MB (null where `/proc` is not there). `VmHWM` covers
    /// the process's whole life, so this is the peak over every API call
    /// of the benchmark so far: the one-at-a-time enqueues and the bulk
    /// one (the enqueue phase runs first).
    api_peak_rss_mb: Option<f64>,
}

/// The enqueue phase's figures, API first, then the library.
#[derive(Serialize, Debug)]
pub struct EnqueueReport {
    single: Throughput,
    single_parallel: Throughput,
    bulk: BulkThroughput,
    db_single: Throughput,
    db_single_parallel: Throughput,
    db_bulk: Throughput,
}

/// Runs the six enqueue measurements, each on an empty queue.
///
/// # Errors
///
/// A call fails, or a queue does not hold the runs that were timed.
pub async fn run(harness: &Harness, n: u64, n_single: u64) -> anyhow::Result<EnqueueReport> {
    let api = ApiClient::new(harness);
    let single_call = {
        let api = api.clone();
        move |i: u64| {
            let api = api.clone();
            async move {
                let request = api.run_request(i)?;
                api.create_run(request).await?;
                Ok(1)
            }
        }
    };
    let single = measure(
        harness,
        "single",
        "POST /v1/runs, 1 in flight",
        n_single,
        n_single,
        1,
        single_call.clone(),
    )
    .await?;
    let single_parallel = measure(
        harness,
        "single_parallel",
        "POST /v1/runs, 10 in flight",
        n_single,
        n_single,
        PARALLEL,
        single_call,
    )
    .await?;
    let bulk = {
        let api = api.clone();
        measure(
            harness,
            "bulk",
            "POST /v1/runs/batch, 1000 per call",
            n,
            batches(n),
            1,
            move |batch| {
                let api = api.clone();
                async move { api.create_runs(batch_range(batch, n)).await }
            },
        )
        .await?
    };
    let bulk = BulkThroughput {
        throughput: bulk,
        api_peak_rss_mb: harness.api_peak_rss_bytes().map(megabytes),
    };

    let library_single = {
        let pool = harness.pool.clone();
        let tenant = harness.tenant;
        move |i: u64| {
            let pool = pool.clone();
            async move {
                let mut tx = pool.begin().await.context("beginning a transaction")?;
                db::runs::enqueue(&mut tx, bench_new_run(tenant, i))
                    .await
                    .context("enqueueing a run")?;
                tx.commit().await.context("committing a run")?;
                Ok(1)
            }
        }
    };
    let db_single = measure(
        harness,
        "db_single",
        "runq_shared::enqueue, own transaction, 1 in flight",
        n_single,
        n_single,
        1,
        library_single.clone(),
    )
    .await?;
    let db_single_parallel = measure(
        harness,
        "db_single_parallel",
        "runq_shared::enqueue, own transaction, 10 in flight",
        n_single,
        n_single,
        PARALLEL,
        library_single,
    )
    .await?;
    let db_bulk = {
        let pool = harness.pool.clone();
        let tenant = harness.tenant;
        measure(
            harness,
            "db_bulk",
            "runq_shared::enqueue_many, 1000 per transaction",
            n,
            batches(n),
            1,
            move |batch| {
                let pool = pool.clone();
                async move { library_batch(&pool, &[tenant], batch_range(batch, n)).await }
            },
        )
        .await?
    };
    harness.reset().await?;
    Ok(EnqueueReport {
        single,
        single_parallel,
        bulk,
        db_single,
        db_single_parallel,
        db_bulk,
    })
}

/// Inserts runs `0..n` with the library's bulk path, 1,000 per transaction,
/// counting them into `bar`.
///
/// # Errors
///
/// Database errors.
pub async fn fill(
    harness: &Harness,
    n: u64,
    tenants: &[TenantId],
    bar: &super::progress::Bar,
) -> anyhow::Result<()> {
    for batch in 0..batches(n) {
        let inserted = library_batch(&harness.pool, tenants, batch_range(batch, n)).await?;
        bar.add(inserted);
    }
    Ok(())
}

/// Calls of [`BATCH`] runs (the last one shorter) that insert `n` runs.
fn batches(n: u64) -> u64 {
    n.div_ceil(BATCH as u64)
}

/// The run numbers of batch `batch` out of `n` runs.
fn batch_range(batch: u64, n: u64) -> std::ops::Range<u64> {
    let start = batch * BATCH as u64;
    start..(start + BATCH as u64).min(n)
}

/// Inserts runs numbered `range` in one `enqueue_many` transaction, run `i`
/// for tenant `i mod tenants`.
pub async fn library_batch(
    pool: &PgPool,
    tenants: &[TenantId],
    range: std::ops::Range<u64>,
) -> anyhow::Result<u64> {
    let runs = range
        .map(|i| bench_new_run(tenants[(i % tenants.len() as u64) as usize], i))
        .collect::<Vec<_>>();
    let count = runs.len() as u64;
    let mut tx = pool.begin().await.context("beginning a transaction")?;
    db::runs::enqueue_many(&mut tx, runs)
        .await
        .context("enqueueing a batch")?;
    tx.commit().await.context("committing a batch")?;
    Ok(count)
}

/// Empties the queue, then measures `name` (the report's key): makes `calls` calls of `op` (numbered from 0) from
/// `in_flight` tasks, each taking the next number when its call returns, and
/// times them. `op` returns the runs it inserted; `jobs` is their total.
async fn measure<F, Fut>(
    harness: &Harness,
    name: &str,
    label: &'static str,
    jobs: u64,
    calls: u64,
    in_flight: usize,
    op: F,
) -> anyhow::Result<Throughput>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<u64>> + Send + 'static,
{
    harness.reset().await?;
    let bar = harness.progress.bar(format!("enqueue {name}"), jobs);
    let next = Arc::new(AtomicU64::new(0));
    // Dropping the set (an early return on error) aborts the other tasks.
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for _ in 0..in_flight {
        let op = op.clone();
        let next = next.clone();
        let counter = bar.counter();
        tasks.spawn(async move {
            loop {
                let call = next.fetch_add(1, Ordering::Relaxed);
                if call >= calls {
                    return anyhow::Ok(());
                }
                counter.add(op(call).await?);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.context("an enqueue task panicked")??;
    }
    let elapsed = started.elapsed();
    bar.finish();
    check_count(harness, jobs, label).await?;
    Ok(Throughput {
        api: label,
        jobs,
        ms: whole_ms(elapsed),
        jobs_per_s: per_second(jobs, elapsed),
    })
}

/// A client of the API process with the bench tenant's token.
#[derive(Clone)]
pub struct ApiClient {
    client: reqwest::Client,
    runs_url: Arc<str>,
    batch_url: Arc<str>,
    authorization: Arc<str>,
    /// The queue of the runs [`Self::run_request`] builds.
    queue: Arc<str>,
}

impl ApiClient {
    /// A client of `harness`'s API, sending single runs to the bench queue.
    pub fn new(harness: &Harness) -> Self {
        Self {
            client: harness.client.clone(),
            runs_url: format!("{}/runs", harness.base).into(),
            batch_url: format!("{}/runs/batch", harness.base).into(),
            authorization: harness.authorization.clone().into(),
            queue: QUEUE.into(),
        }
    }

    /// This client, sending single runs to `queue` instead.
    pub fn on_queue(self, queue: &str) -> Self {
        Self {
            queue: queue.into(),
            ..self
        }
    }

    /// The `POST /v1/runs` request for bench run `i` on this client's
    /// queue, built and serialised but not sent.
    ///
    /// # Errors
    ///
    /// The request cannot be built.
    pub fn run_request(&self, i: u64) -> anyhow::Result<reqwest::Request> {
        self.client
            .post(&*self.runs_url)
            .header(AUTHORIZATION, &*self.authorization)
            .json(&bench_run_on(&self.queue, i))
            .build()
            .context("building POST /v1/runs")
    }

    /// Sends a request of [`Self::run_request`] and returns the created run.
    ///
    /// # Errors
    ///
    /// The request fails or is not answered 201.
    pub async fn create_run(&self, request: reqwest::Request) -> anyhow::Result<Run> {
        let response = self
            .client
            .execute(request)
            .await
            .context("POST /v1/runs")?;
        let response = expect_created(response, "POST /v1/runs").await?;
        response
            .json::<Run>()
            .await
            .context("reading the answer of POST /v1/runs")
    }

    /// Creates runs numbered `range` with one `POST /v1/runs/batch`.
    ///
    /// # Errors
    ///
    /// The request fails, is not answered 201, or creates fewer runs.
    pub async fn create_runs(&self, range: std::ops::Range<u64>) -> anyhow::Result<u64> {
        let body = CreateRuns {
            runs: range.map(bench_run).collect(),
        };
        let count = body.runs.len() as u64;
        let response = self
            .client
            .post(&*self.batch_url)
            .header(AUTHORIZATION, &*self.authorization)
            .json(&body)
            .send()
            .await
            .context("POST /v1/runs/batch")?;
        let response = expect_created(response, "POST /v1/runs/batch").await?;
        let created = response
            .json::<CreatedRuns>()
            .await
            .context("reading the answer of POST /v1/runs/batch")?;
        if created.runs.len() as u64 != count {
            bail!(
                "POST /v1/runs/batch created {} runs of {count}",
                created.runs.len()
            );
        }
        Ok(count)
    }
}

/// `response` if it is a 201, else an error carrying its body (a problem
/// document saying why).
async fn expect_created(
    response: reqwest::Response,
    call: &str,
) -> anyhow::Result<reqwest::Response> {
    let status = response.status();
    if status == StatusCode::CREATED {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    bail!("{call} answered {status}: {body}")
}
