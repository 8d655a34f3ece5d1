//! Flow control across the fleet: a queue's concurrency limit, its start
//! rate and its pause hold with several real worker processes, enforced in
//! the claim.

use std::time::Duration;

use runq_shared::db::queues::{self, QueueChange};
use runq_shared::{CreateRun, NewStep};
use serde_json::json;

use crate::support::process::Proc;
use crate::support::{self, TestDb};

fn run_in(queue: &str, step: NewStep) -> CreateRun {
    let mut run = CreateRun::new(vec![step]);
    run.queue = queue.to_owned();
    run
}

async fn set(db: &TestDb, queue: &str, change: QueueChange) {
    let mut conn = db.pool.acquire().await.expect("connection");
    queues::set(&mut conn, queue, &change)
        .await
        .expect("settings");
}

async fn running_in(db: &TestDb, queue: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM runs WHERE queue = $1 AND status = 'running'")
        .bind(queue)
        .fetch_one(&db.pool)
        .await
        .expect("count")
}

/// A queue limited to 3 with six worker processes never has more than 3
/// runs running (sampled every 20 ms throughout), and finishes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_limited_to_three_never_runs_more_than_three() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    set(
        &db,
        "limited",
        QueueChange {
            concurrency: Some(Some(3)),
            ..QueueChange::default()
        },
    )
    .await;
    let env = [("RUNQ_QUEUES", "limited"), ("RUNQ_CONCURRENCY", "4")];
    let mut workers: Vec<Proc> = (0..6).map(|_| Proc::worker(&db.url, &env)).collect();
    db.enqueue(
        tenant,
        (0..24)
            .map(|_| run_in("limited", NewStep::new("s", "sleep", json!({ "ms": 150 }))))
            .collect(),
    )
    .await;
    let most = std::sync::atomic::AtomicI64::new(0);
    let done = support::poll(Duration::from_secs(60), || async {
        most.fetch_max(
            running_in(&db, "limited").await,
            std::sync::atomic::Ordering::Relaxed,
        );
        (db.scalar::<i64>("SELECT count(*) FROM runs WHERE status = 'succeeded'")
            .await
            == 24)
            .then_some(())
    })
    .await;
    let most = most.into_inner();
    for worker in &mut workers {
        worker.stop().await;
    }
    assert!(done.is_some(), "every run finished");
    assert!(most <= 3, "{most} runs of a queue limited to 3 ran at once");
    assert!(
        most >= 2,
        "the limit, not the workers, bounded the queue ({most} at most)"
    );
}

/// A queue limited to 10 starts per second, drained by three worker
/// processes, starts its 100 runs no faster than that: within any second at
/// most the bucket (10) plus a second's refill, and the whole takes at
/// least the 9 s the rate allows after the first burst (8 s with tolerance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_queue_starts_no_faster_than_its_rate() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    set(
        &db,
        "slow",
        QueueChange {
            rate_per_second: Some(Some(10.0)),
            ..QueueChange::default()
        },
    )
    .await;
    let env = [("RUNQ_QUEUES", "slow")];
    let mut workers: Vec<Proc> = (0..3).map(|_| Proc::worker(&db.url, &env)).collect();
    db.enqueue(
        tenant,
        (0..100)
            .map(|i| run_in("slow", NewStep::new("e", "echo", json!({ "i": i }))))
            .collect(),
    )
    .await;
    db.wait_all_terminal(Duration::from_secs(60)).await;
    for worker in &mut workers {
        worker.stop().await;
    }
    let starts: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM started_at)::float8 FROM runs ORDER BY started_at",
    )
    .fetch_all(&db.pool)
    .await
    .expect("starts");
    assert_eq!(starts.len(), 100);
    let busiest = starts
        .iter()
        .map(|from| {
            starts
                .iter()
                .filter(|t| **t >= *from && **t < from + 1.0)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        busiest <= 21,
        "{busiest} starts within one second at 10 per second"
    );
    let span = starts[99] - starts[0];
    assert!(span >= 8.0, "100 runs at 10/s took only {span:.2} s");
}

/// A paused queue is not claimed (watched for ten poll intervals), other
/// queues are, and resuming lets its runs through.
#[tokio::test]
async fn a_paused_queue_is_not_claimed_until_resumed() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    set(
        &db,
        "held",
        QueueChange {
            paused: Some(true),
            ..QueueChange::default()
        },
    )
    .await;
    let env = [("RUNQ_QUEUES", "held,open")];
    let mut worker = Proc::worker(&db.url, &env);
    let echo = || NewStep::new("e", "echo", json!({}));
    db.enqueue(tenant, (0..5).map(|_| run_in("held", echo())).collect())
        .await;
    db.enqueue(tenant, vec![run_in("open", echo())]).await;
    db.wait_for("the open queue's run", Duration::from_secs(20), || async {
        db.count_status("succeeded").await == 1
    })
    .await;
    // The worker polls every 50 ms: ten polls pass with nothing claimed.
    support::holds_throughout(Duration::from_millis(500), || async {
        let started: i64 = db
            .scalar("SELECT count(*) FROM runs WHERE queue = 'held' AND started_at IS NOT NULL")
            .await;
        assert_eq!(started, 0, "a paused queue was claimed");
    })
    .await;
    set(
        &db,
        "held",
        QueueChange {
            paused: Some(false),
            ..QueueChange::default()
        },
    )
    .await;
    db.wait_all_terminal(Duration::from_secs(20)).await;
    worker.stop().await;
    assert_eq!(db.count_status("succeeded").await, 6);
    let settings: i64 = db.scalar("SELECT count(*) FROM queues").await;
    assert_eq!(settings, 0, "a queue with no settings left has no row");
}

/// A slot freed in a limited queue is taken at once, not at the worker's
/// next poll: with polls 10 s apart, a worker drains 30 runs through a
/// queue limited to 2 (each run frees a slot the worker claims again) in a
/// few seconds, where waiting for polls would take minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_slot_of_a_limited_queue_is_taken_without_waiting_for_a_poll() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    set(
        &db,
        "tight",
        QueueChange {
            concurrency: Some(Some(2)),
            ..QueueChange::default()
        },
    )
    .await;
    db.enqueue(
        tenant,
        (0..30)
            .map(|_| run_in("tight", NewStep::new("s", "sleep", json!({ "ms": 20 }))))
            .collect(),
    )
    .await;
    let started = std::time::Instant::now();
    let env = [
        ("RUNQ_QUEUES", "tight"),
        ("RUNQ_CONCURRENCY", "4"),
        ("RUNQ_POLL_INTERVAL_MS", "10000"),
    ];
    let mut worker = Proc::worker(&db.url, &env);
    db.wait_all_terminal(Duration::from_secs(20)).await;
    let took = started.elapsed();
    worker.stop().await;
    assert_eq!(db.count_status("succeeded").await, 30);
    assert!(
        took < Duration::from_secs(10),
        "30 runs through 2 slots took {took:?}: freed slots waited for polls"
    );
}
