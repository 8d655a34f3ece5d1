//! Correctness under load: many runs, many workers with their own pools,
//! every run executed exactly once and accounted for in the outbox.

use std::time::Duration;

use runq_shared::config::WorkerConfig;
use runq_shared::{CreateRun, NewStep, RunStatus};
use runq_worker::Worker;
use serde_json::json;

use crate::support::handlers::{Count, Double, Executions};
use crate::support::{
    check_invariants, echo_run, holds_throughout, worker_config, RunningWorker, TestDb,
};

fn start_workers(
    db: &TestDb,
    count: usize,
    concurrency: usize,
    executions: &Executions,
) -> Vec<RunningWorker> {
    (0..count)
        .map(|i| {
            RunningWorker::start(
                Worker::new(db.new_pool(3), worker_config(concurrency))
                    .register(Count {
                        executions: executions.clone(),
                        worker: format!("w{i}"),
                    })
                    .register(Double),
            )
        })
        .collect()
}

async fn stop_all(workers: Vec<RunningWorker>) {
    for worker in workers {
        worker.stop().await;
    }
}

/// 100 runs, 10 workers: all succeed, each executed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_runs_on_ten_workers_each_execute_once() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let executions = Executions::default();
    let workers = start_workers(&db, 10, 3, &executions);
    let runs = db
        .enqueue(
            tenant,
            (0..100)
                .map(|i| CreateRun::new(vec![NewStep::new("c", "count", json!({ "i": i }))]))
                .collect(),
        )
        .await;

    db.wait_all_terminal(Duration::from_secs(60)).await;
    stop_all(workers).await;

    assert_eq!(db.count_status("succeeded").await, 100);
    assert!(
        executions.repeated().is_empty(),
        "executed twice: {:?}",
        executions.repeated()
    );
    assert_eq!(executions.distinct(), 100);
    for run in &runs {
        assert_eq!(executions.count(run.id, 0), 1);
    }
    let attempts: i64 = db
        .scalar("SELECT count(*) FROM runs WHERE attempt <> 1")
        .await;
    assert_eq!(attempts, 0, "no run needed a second attempt");
}

/// 50 two-step runs where step 2 computes from step 1's output: every result right.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_two_step_runs_compute_from_previous_output() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let executions = Executions::default();
    let workers = start_workers(&db, 4, 5, &executions);
    let runs = db
        .enqueue(
            tenant,
            (0..50)
                .map(|i| {
                    CreateRun::new(vec![
                        NewStep::new("double", "double", json!({ "value": i })),
                        NewStep::new("double again", "double", json!({})),
                    ])
                })
                .collect(),
        )
        .await;

    db.wait_all_terminal(Duration::from_secs(60)).await;
    stop_all(workers).await;

    for (i, run) in runs.iter().enumerate() {
        let (status, result): (String, serde_json::Value) =
            sqlx::query_as("SELECT status::text, result FROM runs WHERE id = $1")
                .bind(run.id)
                .fetch_one(&db.pool)
                .await
                .expect("run");
        assert_eq!(status, "succeeded");
        assert_eq!(result, json!({ "value": 4 * i as i64 }), "run {i}");
    }
}

/// 120 runs alternating success and permanent failure: exactly 60 and 60.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alternating_success_and_permanent_failure_split_sixty_sixty() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let executions = Executions::default();
    let workers = start_workers(&db, 5, 4, &executions);
    db.enqueue(
        tenant,
        (0..120)
            .map(|i| {
                let step = if i % 2 == 0 {
                    NewStep::new("ok", "echo", json!({ "i": i }))
                } else {
                    NewStep::new("no", "fail", json!({ "message": format!("run {i} fails") }))
                };
                let mut run = CreateRun::new(vec![step]);
                run.max_attempts = 2;
                run
            })
            .collect(),
    )
    .await;

    db.wait_all_terminal(Duration::from_secs(60)).await;
    stop_all(workers).await;

    assert_eq!(db.count_status("succeeded").await, 60);
    assert_eq!(db.count_status("failed").await, 60);
    let wrong: i64 = db
        .scalar(
            "SELECT count(*) FROM runs WHERE (status = 'failed' AND attempt <> 2) \
             OR (status = 'succeeded' AND attempt <> 1)",
        )
        .await;
    assert_eq!(wrong, 0, "failures used both attempts, successes one");
}

/// Invariants 2 and 3 under load: 200 runs, 15 workers; all complete, none
/// twice, and each run has exactly one `run.created` and one terminal outbox row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_runs_on_fifteen_workers_have_exactly_one_terminal_outbox_row() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let executions = Executions::default();
    let workers = start_workers(&db, 15, 4, &executions);
    db.enqueue(
        tenant,
        (0..200)
            .map(|i| CreateRun::new(vec![NewStep::new("c", "count", json!({ "i": i }))]))
            .collect(),
    )
    .await;

    db.wait_all_terminal(Duration::from_secs(60)).await;
    stop_all(workers).await;

    assert_eq!(db.count_status(RunStatus::Succeeded.as_str()).await, 200);
    assert!(executions.repeated().is_empty());
    let bad: i64 = db
        .scalar(
            "SELECT count(*) FROM runs r WHERE \
               (SELECT count(*) FROM outbox o WHERE o.run_id = r.id AND o.event_type = 'run.created') <> 1 \
            OR (SELECT count(*) FROM outbox o WHERE o.run_id = r.id AND o.event_type = 'run.started') <> 1 \
            OR (SELECT count(*) FROM outbox o WHERE o.run_id = r.id \
                  AND o.event_type IN ('run.succeeded', 'run.failed', 'run.cancelled', 'run.stopped')) <> 1",
        )
        .await;
    assert_eq!(
        bad, 0,
        "every run: one created, one started, one terminal outbox row"
    );
    let orphans: i64 =
        db.scalar("SELECT count(*) FROM outbox o WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = o.run_id)").await;
    assert_eq!(orphans, 0);
}

/// A worker keeps claiming for as long as the queue has runs, on its own: no
/// poll and no notification is needed after a full claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_claims_again_without_polls_or_notifications() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    db.enqueue(
        tenant,
        (0..300).map(|i| echo_run(json!({ "i": i }))).collect(),
    )
    .await;
    let config = WorkerConfig {
        prefetch: 10,
        // Only the first claim may come from start-up; every later one must
        // follow from room freed by finished runs.
        poll_interval_ms: 3_600_000,
        ..worker_config(5)
    };
    let worker = RunningWorker::start(Worker::new(db.new_pool(4), config));

    db.wait_for(
        "all 300 runs to succeed",
        Duration::from_secs(30),
        || async { db.count_status("succeeded").await == 300 },
    )
    .await;
    worker.stop().await;
    check_invariants(&db).await;
}

/// While its outcomes cannot be written, a worker holds no more runs than its
/// slots plus its prefetch: finished runs waiting in the completer still count,
/// so the rest of the queue stays claimable by other workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_holds_at_most_its_capacity_while_its_writes_are_blocked() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    db.enqueue(
        tenant,
        (0..100).map(|i| echo_run(json!({ "i": i }))).collect(),
    )
    .await;
    // Completions update run_steps and wait on this lock; claims only read it.
    let mut blocker = db.pool.begin().await.expect("transaction");
    sqlx::query("LOCK TABLE run_steps IN SHARE MODE")
        .execute(&mut *blocker)
        .await
        .expect("lock run_steps");
    let config = WorkerConfig {
        prefetch: 10,
        ..worker_config(5)
    };
    let capacity = (config.concurrency + config.prefetch) as i64;
    let worker = RunningWorker::start(Worker::new(db.new_pool(4), config));

    db.wait_for(
        "the worker's completion to wait on the lock",
        Duration::from_secs(10),
        || async {
            let waiting: i64 = db
                .scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .await;
            waiting > 0
        },
    )
    .await;
    db.wait_for(
        "the worker to fill its capacity",
        Duration::from_secs(10),
        || async { db.count_status("running").await >= capacity },
    )
    .await;
    // Every executor has finished and handed its outcome over, so a worker
    // counting only busy slots would now claim the whole queue within
    // milliseconds. Watch for a second (twenty claim polls) that it does not.
    holds_throughout(Duration::from_secs(1), || async {
        let held = db.count_status("running").await;
        assert!(
            held <= capacity,
            "held {held} runs at once, capacity {capacity}"
        );
    })
    .await;
    blocker.commit().await.expect("release the lock");

    db.wait_for(
        "all 100 runs to succeed",
        Duration::from_secs(30),
        || async { db.count_status("succeeded").await == 100 },
    )
    .await;
    worker.stop().await;
    check_invariants(&db).await;
}
