//! Visibility: queues with counts, waits and throughput per tenant, and
//! the live workers.

use std::time::Duration;

use reqwest::StatusCode;
use runq_shared::{CreateRun, NewStep, QueueList, QueueStats, WorkerList};
use runq_worker::Worker;
use serde_json::json;

use crate::support::http::Served;
use crate::support::{echo_run, token, worker_config, RunningWorker, TestDb};

fn in_queue(mut run: CreateRun, queue: &str) -> CreateRun {
    run.queue = queue.to_owned();
    run
}

/// A tenant's queues count its runs by status, give the oldest due run's
/// wait and the last minute's starts and finishes; another tenant sees
/// none of it.
#[tokio::test]
async fn queues_show_counts_waits_and_throughput_per_tenant() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let bearer = token(&db, tenant).await;
    let served = Served::start(db, bearer);
    let db = &served.db;
    let mut failing = CreateRun::new(vec![NewStep::new("f", "fail", json!({}))]);
    failing.max_attempts = 1;
    let mut runs: Vec<CreateRun> = (0..3)
        .map(|i| in_queue(echo_run(json!({ "i": i })), "alpha"))
        .collect();
    runs.push(in_queue(failing, "beta"));
    db.enqueue(tenant, runs).await;
    let config = runq_shared::config::WorkerConfig {
        queues: vec!["alpha".to_owned(), "beta".to_owned()],
        ..worker_config(4)
    };
    let worker = RunningWorker::start(Worker::new(db.pool.clone(), config));
    db.wait_all_terminal(Duration::from_secs(20)).await;
    worker.stop().await;
    // Two runs waiting 30 s in alpha, one delayed an hour in beta.
    db.enqueue(
        tenant,
        (0..2)
            .map(|_| in_queue(echo_run(json!({})), "alpha"))
            .collect(),
    )
    .await;
    db.execute("UPDATE runs SET run_at = now() - interval '30 seconds' WHERE status = 'pending'")
        .await;
    let mut later = in_queue(echo_run(json!({})), "beta");
    later.run_at = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    db.enqueue(tenant, vec![later]).await;

    let list: QueueList = served.get("/v1/queues").await.json().await.expect("queues");
    let names: Vec<&str> = list.queues.iter().map(|q| q.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    let alpha = &list.queues[0];
    assert_eq!(
        (alpha.pending, alpha.running, alpha.succeeded, alpha.failed),
        (2, 0, 3, 0)
    );
    let waited = alpha.oldest_pending_seconds.expect("a due run waits");
    assert!((29.0..120.0).contains(&waited), "{waited}");
    assert_eq!(
        (alpha.started_last_minute, alpha.finished_last_minute),
        (3, 3)
    );
    let beta: QueueStats = served
        .get("/v1/queues/beta")
        .await
        .json()
        .await
        .expect("beta");
    assert_eq!((beta.pending, beta.failed), (1, 1));
    assert_eq!(
        beta.oldest_pending_seconds, None,
        "a delayed run is not waiting yet"
    );

    let missing = served.get("/v1/queues/gamma").await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let other = db.tenant("other").await;
    let other_token = token(db, other).await;
    let theirs: QueueList = served
        .client
        .get(served.url("/v1/queues"))
        .bearer_auth(&other_token)
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("queues");
    assert!(
        theirs.queues.is_empty(),
        "another tenant's queues are not shown"
    );
    let peek = served
        .client
        .get(served.url("/v1/queues/alpha"))
        .bearer_auth(&other_token)
        .send()
        .await
        .expect("send");
    assert_eq!(peek.status(), StatusCode::NOT_FOUND);
}

/// `GET /v1/workers` lists the live worker with its queues, concurrency and
/// the run it holds; a stopped worker is gone from it.
#[tokio::test]
async fn workers_lists_live_workers_with_what_they_hold() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let bearer = token(&db, tenant).await;
    let served = Served::start(db, bearer);
    let db = &served.db;
    let worker = RunningWorker::start(Worker::new(db.pool.clone(), worker_config(3)));
    db.enqueue(
        tenant,
        vec![CreateRun::new(vec![NewStep::new(
            "s",
            "sleep",
            json!({ "ms": 3000 }),
        )])],
    )
    .await;
    db.wait_for("the sleep runs", Duration::from_secs(10), || async {
        db.count_status("running").await == 1
    })
    .await;
    let list: WorkerList = served
        .get("/v1/workers")
        .await
        .json()
        .await
        .expect("workers");
    assert_eq!(list.workers.len(), 1);
    let live = &list.workers[0];
    assert_eq!(live.id, worker.id);
    assert_eq!((live.concurrency, live.in_flight), (3, 1));
    assert_eq!(live.queues, ["default"]);
    assert_eq!(live.pid, std::process::id() as i32);
    worker.stop().await;
    let list: WorkerList = served
        .get("/v1/workers")
        .await
        .json()
        .await
        .expect("workers");
    assert!(list.workers.is_empty(), "a stopped worker is not listed");
}
