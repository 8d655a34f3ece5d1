//! Criterion micro-benchmarks of runq's hot path against a real Postgres: the
//! set-based insert, the batched claim, the batched completion, and the JSON
//! envelopes a worker reads and writes for every step and event.
//!
//! DESIGN.md (Performance) sizes the hot path by commits, not by runs, so each
//! database case times one statement or one transaction over a batch and
//! reports runs per second. Only the statement under test is timed: the runs a
//! claim takes and the claims a completion finishes are made beforehand with
//! [`Bencher::iter_custom`], outside the measured span.
//!
//! The database is `DATABASE_URL`, else database `runq_criterion` found the way
//! `runq dev` finds one (local Postgres at 127.0.0.1:5432, else a throwaway
//! cluster). Each case starts from empty tables, so one case's leftovers do not
//! slow the next. `cargo bench --bench hot_path -- --test` runs every case once.

use std::cell::Cell;
use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{black_box, Bencher, BenchmarkId, Criterion, Throughput};
use runq_devtools::postgres::{pick_database, PickedDatabase, ThrowawayArgs};
use runq_shared::db::runs;
use runq_shared::db::{self, tenants};
use runq_shared::protocol::{Backoff, ClaimedRun, Completion, Outcome};
use runq_shared::{
    EventType, NewRun, NewStep, OutboxEvent, RunSnapshot, RunStatus, StepInput, TenantId,
};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tokio::runtime::Runtime;
use uuid::Uuid;

/// The queue every benchmark run waits in.
const QUEUE: &str = "bench";
/// The lease the claim takes, as a worker's default would.
const LEASE_MS: i64 = 30_000;
/// Pending runs a claim always finds beyond its own batch, so it is measured
/// on a loaded queue rather than on the last few rows of an emptying one.
const BACKLOG: u64 = 1_000;
/// Runs inserted per refill (outside the timed span); at least any claim limit.
const REFILL: u64 = 1_000;
/// The worker's retry backoff; succeeded runs never use it.
const BACKOFF: Backoff = Backoff {
    base_ms: 1_000.0,
    max_ms: 60_000.0,
};

/// What the database cases share: the pool and the tenant owning every run.
struct Bench {
    pool: PgPool,
    tenant: TenantId,
    /// Keeps a throwaway cluster (if one was started) alive until the end.
    _database: PickedDatabase,
}

impl Bench {
    async fn connect() -> Self {
        let url = std::env::var("DATABASE_URL").ok();
        let database = pick_database(url.as_deref(), "runq_criterion", &ThrowawayArgs::default())
            .await
            .expect("no Postgres: set DATABASE_URL or run one at 127.0.0.1:5432");
        let pool = db::pool(&database.url, 4, Duration::from_secs(30))
            .expect("the picked database url parses");
        db::migrate(&pool).await.expect("migrations apply");
        let mut conn = pool.acquire().await.expect("the database answers");
        let tenant = tenants::ensure(&mut conn, "criterion")
            .await
            .expect("the bench tenant can be created");
        // The hot path as runq's own tenants take it: not counted.
        db::quotas::set(
            &mut conn,
            tenant,
            &runq_shared::quotas::TenantQuotas::plan(runq_shared::quotas::Plan::Unlimited),
        )
        .await
        .expect("the bench tenant can be made unlimited");
        drop(conn);
        Self {
            pool,
            tenant,
            _database: database,
        }
    }

    /// Empties the tables the hot path writes. A runtime query: benches are
    /// test code, and this statement has no result to check at compile time.
    async fn reset(&self) {
        sqlx::query("TRUNCATE runs, run_steps, run_events, outbox")
            .execute(&self.pool)
            .await
            .expect("the hot-path tables can be truncated");
    }

    /// `count` one-step echo runs on [`QUEUE`], as a client would submit them.
    fn echo_runs(&self, count: u64) -> Vec<NewRun> {
        (0..count)
            .map(|index| {
                let mut run = NewRun::new(
                    self.tenant,
                    vec![NewStep::new("echo", "echo", json!({ "index": index }))],
                );
                run.run.queue = QUEUE.to_owned();
                run
            })
            .collect()
    }

    /// Inserts `count` runs in one transaction.
    async fn insert(&self, count: u64) {
        let mut tx = self.pool.begin().await.expect("a transaction begins");
        let inserted = runq_shared::enqueue_many(&mut tx, self.echo_runs(count))
            .await
            .expect("echo runs are valid");
        assert_eq!(inserted.len() as u64, count, "every run is new");
        tx.commit().await.expect("the insert commits");
    }
}

/// One claiming case's queue: emptied on its first sample, then kept at
/// [`BACKLOG`] or more pending runs beyond what the next claim takes.
struct Queue<'a> {
    bench: &'a Bench,
    pending: Cell<Option<u64>>,
}

impl<'a> Queue<'a> {
    fn new(bench: &'a Bench) -> Self {
        Self {
            bench,
            pending: Cell::new(None),
        }
    }

    /// Claims exactly `limit` runs; only the claim statement is timed.
    ///
    /// The reset happens here, on the first call, rather than when the case is
    /// declared, so a case a filter leaves out touches no table.
    async fn claim(&self, conn: &mut PgConnection, worker: Uuid, limit: u64) -> TimedClaim {
        let mut pending = match self.pending.get() {
            Some(pending) => pending,
            None => {
                self.bench.reset().await;
                0
            }
        };
        while pending < BACKLOG + limit {
            self.bench.insert(REFILL).await;
            pending += REFILL;
        }
        let queues = [QUEUE.to_owned()];
        let start = Instant::now();
        let claimed = runs::claim(conn, worker, &queues, limit as i64, LEASE_MS)
            .await
            .expect("the claim statement runs");
        let elapsed = start.elapsed();
        assert_eq!(
            claimed.len() as u64,
            limit,
            "the queue held enough pending runs"
        );
        self.pending.set(Some(pending - limit));
        TimedClaim { claimed, elapsed }
    }
}

struct TimedClaim {
    claimed: Vec<ClaimedRun>,
    elapsed: Duration,
}

/// `enqueue_many` in its own transaction, commit included: what one API batch
/// request or one library call costs.
fn enqueue_many(criterion: &mut Criterion, runtime: &Runtime, bench: &Bench) {
    let mut group = criterion.benchmark_group("enqueue_many");
    for count in [1u64, 100, 1000] {
        let reset = Cell::new(false);
        group.throughput(Throughput::Elements(count));
        group.bench_with_input(BenchmarkId::from_parameter(count), &count, |b, &count| {
            b.to_async(runtime).iter_custom(|iters| {
                let reset = &reset;
                async move {
                    if !reset.replace(true) {
                        bench.reset().await;
                    }
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iters {
                        let batch = bench.echo_runs(count);
                        let start = Instant::now();
                        let mut tx = bench.pool.begin().await.expect("a transaction begins");
                        let inserted = runq_shared::enqueue_many(&mut tx, batch)
                            .await
                            .expect("echo runs are valid");
                        tx.commit().await.expect("the insert commits");
                        elapsed += start.elapsed();
                        assert_eq!(inserted.len() as u64, count, "every run is new");
                    }
                    elapsed
                }
            });
        });
    }
    group.finish();
}

/// The claim statement a worker issues for its free slots.
fn claim(criterion: &mut Criterion, runtime: &Runtime, bench: &Bench) {
    let mut group = criterion.benchmark_group("claim");
    for limit in [1u64, 50, 200] {
        let queue = Queue::new(bench);
        group.throughput(Throughput::Elements(limit));
        group.bench_with_input(BenchmarkId::from_parameter(limit), &limit, |b, &limit| {
            b.to_async(runtime).iter_custom(|iters| {
                let queue = &queue;
                async move {
                    let mut conn = bench.pool.acquire().await.expect("the database answers");
                    let worker = Uuid::now_v7();
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iters {
                        elapsed += queue.claim(&mut conn, worker, limit).await.elapsed;
                    }
                    elapsed
                }
            });
        });
    }
    group.finish();
}

/// The completer's flush of `size` succeeded runs: one fenced statement,
/// committed alone as the completer does when it has no checkpoints.
fn complete_many(criterion: &mut Criterion, runtime: &Runtime, bench: &Bench) {
    let mut group = criterion.benchmark_group("complete_many");
    for size in [50u64, 200] {
        let queue = Queue::new(bench);
        group.throughput(Throughput::Elements(size));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.to_async(runtime).iter_custom(|iters| {
                let queue = &queue;
                async move {
                    let mut conn = bench.pool.acquire().await.expect("the database answers");
                    let worker = Uuid::now_v7();
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iters {
                        let completions: Vec<Completion> = queue
                            .claim(&mut conn, worker, size)
                            .await
                            .claimed
                            .into_iter()
                            .map(echo_succeeded)
                            .collect();
                        let start = Instant::now();
                        let written = runs::complete_many(&mut conn, &completions, &[], BACKOFF)
                            .await
                            .expect("the completion statement runs");
                        elapsed += start.elapsed();
                        assert_eq!(written.len(), completions.len(), "every lease is held");
                    }
                    elapsed
                }
            });
        });
    }
    group.finish();
}

/// The completion of a one-step echo run: its output is its input.
fn echo_succeeded(run: ClaimedRun) -> Completion {
    let step = run
        .steps
        .into_iter()
        .next_back()
        .expect("an echo run has one step");
    Completion {
        lease: run.lease,
        outcome: Outcome::Succeeded {
            position: step.position,
            output: step.input,
            started_at: run.started_at,
        },
    }
}

/// The envelopes serialised per step (to handlers) and per state change (to
/// relays): their cost is paid once per step or event, beside the database's.
fn json_envelopes(criterion: &mut Criterion) {
    let step_input = StepInput {
        id: Uuid::now_v7(),
        attempt: 1,
        position: 2,
        name: "check health".to_owned(),
        input: json!({ "url": "https://staging.example.test/health", "timeout_ms": 5_000 }),
        prev: json!({ "status": 200, "body": { "deployed": "v1.42.0" } }),
        results: vec![
            json!({ "status": 202, "body": { "deployment": "d-8841" } }),
            json!({ "status": 200, "body": { "deployed": "v1.42.0" } }),
        ],
        metadata: json!({ "environment": "staging", "commit": "9fceb02" }),
        project: None,
    };
    let outbox_event = OutboxEvent {
        event_type: EventType::Succeeded,
        occurred_at: Utc::now(),
        run: RunSnapshot {
            id: Uuid::now_v7(),
            tenant_id: Uuid::now_v7(),
            queue: QUEUE.to_owned(),
            status: RunStatus::Succeeded,
            attempt: 1,
            max_attempts: 3,
            run_at: Utc::now(),
            error: None,
            result: Some(json!({ "status": 200, "body": { "healthy": true } })),
        },
    };
    let mut group = criterion.benchmark_group("json");
    envelope(&mut group, "step_input", &step_input);
    envelope(&mut group, "outbox_event", &outbox_event);
    group.finish();
}

/// Serialises and deserialises `value`, with throughput in encoded bytes.
fn envelope<T>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    value: &T,
) where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let encoded = serde_json::to_vec(value).expect("the envelope serialises");
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function(
        BenchmarkId::new(name, "serialize"),
        |b: &mut Bencher<'_>| {
            b.iter(|| serde_json::to_vec(black_box(value)).expect("the envelope serialises"));
        },
    );
    group.bench_function(
        BenchmarkId::new(name, "deserialize"),
        |b: &mut Bencher<'_>| {
            b.iter(|| {
                serde_json::from_slice::<T>(black_box(&encoded)).expect("the envelope deserialises")
            });
        },
    );
}

fn main() {
    // One thread: the client side stays off the second core, which Postgres needs.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    let bench = runtime.block_on(Bench::connect());
    // Small samples keep the whole run near two minutes on two cores; the
    // command line (`--sample-size`, `--measurement-time`) still overrides them.
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    enqueue_many(&mut criterion, &runtime, &bench);
    claim(&mut criterion, &runtime, &bench);
    complete_many(&mut criterion, &runtime, &bench);
    json_envelopes(&mut criterion);
    criterion.final_summary();
    runtime.block_on(bench.pool.close());
}
