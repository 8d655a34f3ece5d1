//! Claiming: separate worker instances, each with its own pool, racing for
//! the same rows through real concurrent connections.

use std::collections::HashSet;
use std::sync::Arc;

use runq_worker::Worker;
use serde_json::json;
use tokio::sync::Barrier;

use crate::support::{echo_run, worker_config, TestDb};

/// Starts `workers` separate workers (own pools) that each claim up to
/// `limit` at the same instant; returns each worker's claimed run ids.
async fn race(db: &TestDb, workers: usize, limit: usize) -> Vec<(uuid::Uuid, Vec<uuid::Uuid>)> {
    let barrier = Arc::new(Barrier::new(workers));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let worker = Worker::new(db.new_pool(2), worker_config(limit));
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            // Warm the pool so the race is between statements, not connects.
            let _ = worker.claim(0).await;
            barrier.wait().await;
            let claimed = worker.claim(limit).await.expect("claim");
            (
                worker.id(),
                claimed.into_iter().map(|run| run.id()).collect::<Vec<_>>(),
            )
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("claim task"));
    }
    results
}

/// Invariant 1 (one executor): two workers race for one pending run; exactly
/// one gets it, and the run is `running` under that worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_race_for_one_run_exactly_one_claims() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let run = db
        .enqueue(tenant, vec![echo_run(json!({}))])
        .await
        .remove(0);

    let results = race(&db, 2, 1).await;

    let winners: Vec<_> = results.iter().filter(|(_, ids)| !ids.is_empty()).collect();
    assert_eq!(winners.len(), 1, "exactly one worker claims: {results:?}");
    assert_eq!(winners[0].1, vec![run.id]);
    let (status, locked_by, attempt): (String, uuid::Uuid, i32) =
        sqlx::query_as("SELECT status::text, locked_by, attempt FROM runs WHERE id = $1")
            .bind(run.id)
            .fetch_one(&db.pool)
            .await
            .expect("run");
    assert_eq!(status, "running");
    assert_eq!(locked_by, winners[0].0);
    assert_eq!(attempt, 1);
}

/// Five workers, five runs, claimed at once: five claims of distinct runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_workers_claim_five_distinct_runs() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    db.enqueue(
        tenant,
        (0..5).map(|i| echo_run(json!({ "i": i }))).collect(),
    )
    .await;

    let results = race(&db, 5, 1).await;

    let claimed: Vec<uuid::Uuid> = results.iter().flat_map(|(_, ids)| ids.clone()).collect();
    assert_eq!(claimed.len(), 5, "every worker claims one: {results:?}");
    assert_eq!(
        claimed.iter().collect::<HashSet<_>>().len(),
        5,
        "all distinct"
    );
    assert_eq!(db.count_status("running").await, 5);
}

/// Twenty workers race for ten runs: ten claims, ten empty-handed, no run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_workers_race_for_ten_runs() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    db.enqueue(
        tenant,
        (0..10).map(|i| echo_run(json!({ "i": i }))).collect(),
    )
    .await;

    let results = race(&db, 20, 1).await;

    let claimed: Vec<uuid::Uuid> = results.iter().flat_map(|(_, ids)| ids.clone()).collect();
    let empty = results.iter().filter(|(_, ids)| ids.is_empty()).count();
    assert_eq!(claimed.len(), 10);
    assert_eq!(empty, 10);
    assert_eq!(
        claimed.iter().collect::<HashSet<_>>().len(),
        10,
        "no run claimed twice"
    );
    let started: i64 = db
        .scalar("SELECT count(*) FROM outbox WHERE event_type = 'run.started'")
        .await;
    assert_eq!(started, 10, "one run.started row per claim");
}

/// Invariant 4 (FIFO): runs created at staggered times are claimed oldest
/// first, and a higher priority run before older lower-priority ones.
#[tokio::test]
async fn claims_oldest_first_and_higher_priority_first() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let mut ids = Vec::new();
    for i in 0..4 {
        // Separate transactions: distinct created_at/run_at and ids.
        ids.push(
            db.enqueue(tenant, vec![echo_run(json!({ "i": i }))])
                .await
                .remove(0)
                .id,
        );
    }
    let mut urgent = echo_run(json!({ "urgent": true }));
    urgent.priority = 5;
    let urgent = db.enqueue(tenant, vec![urgent]).await.remove(0).id;
    let worker = Worker::new(db.new_pool(2), worker_config(1));
    let mut order = Vec::new();
    for _ in 0..5 {
        let claimed = worker.claim(1).await.expect("claim");
        assert_eq!(claimed.len(), 1);
        order.push(claimed[0].id());
    }
    let mut expected = vec![urgent];
    expected.extend(ids);
    assert_eq!(order, expected, "priority first, then oldest first");
}

/// A claim batch comes back in claim order too, so a worker's local buffer
/// stays FIFO.
#[tokio::test]
async fn batch_claim_returns_runs_in_fifo_order() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let runs = db
        .enqueue(
            tenant,
            (0..50).map(|i| echo_run(json!({ "i": i }))).collect(),
        )
        .await;
    let worker = Worker::new(db.new_pool(2), worker_config(10));

    let claimed: Vec<_> = worker
        .claim(50)
        .await
        .expect("claim")
        .into_iter()
        .map(|r| r.id())
        .collect();

    assert_eq!(claimed, runs.iter().map(|r| r.id).collect::<Vec<_>>());
}

/// A run whose `run_at` is in the future is not claimed until then.
#[tokio::test]
async fn delayed_run_is_not_claimed_before_run_at() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let mut later = echo_run(json!({}));
    later.run_at = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    let run = db.enqueue(tenant, vec![later]).await.remove(0);
    let worker = Worker::new(db.new_pool(2), worker_config(1));

    assert!(worker.claim(1).await.expect("claim").is_empty());
    sqlx::query("UPDATE runs SET run_at = now() - interval '1 second' WHERE id = $1")
        .bind(run.id)
        .execute(&db.pool)
        .await
        .expect("move time");
    assert_eq!(worker.claim(1).await.expect("claim")[0].id(), run.id);
}
