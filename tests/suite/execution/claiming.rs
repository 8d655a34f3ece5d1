//! Claiming: concurrent workers take different runs, cancelled runs are never claimed, values round-trip.

use super::*;

/// Two workers run different runs at the same time, each run by exactly one
/// of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_process_different_runs_at_the_same_time() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let executions = Executions::default();
    let mut config = worker_config(4);
    config.prefetch = 0;
    let a = RunningWorker::start(Worker::new(db.new_pool(4), config.clone()).register(Count {
        executions: executions.clone(),
        worker: "a".into(),
    }));
    let b = RunningWorker::start(Worker::new(db.new_pool(4), config).register(Count {
        executions: executions.clone(),
        worker: "b".into(),
    }));
    let runs = db
        .enqueue(
            tenant,
            (0..8)
                .map(|i| {
                    CreateRun::new(vec![NewStep::new(
                        "c",
                        "count",
                        json!({ "ms": 300, "i": i }),
                    )])
                })
                .collect(),
        )
        .await;

    db.wait_all_terminal(Duration::from_secs(20)).await;
    a.stop().await;
    b.stop().await;

    let mut by_worker: std::collections::HashMap<String, Vec<(i64, i64)>> = Default::default();
    for run in &runs {
        let (run, _) = detail(&db, run.id).await;
        assert_eq!(run.status, RunStatus::Succeeded);
        assert_eq!(run.attempt, 1);
        assert_eq!(
            executions.count(run.id, 0),
            1,
            "run {} executed once",
            run.id
        );
        let worker = run
            .result
            .as_ref()
            .and_then(|r| r["worker"].as_str())
            .expect("worker")
            .to_owned();
        let started = run.started_at.expect("started").timestamp_micros();
        let finished = run.finished_at.expect("finished").timestamp_micros();
        by_worker
            .entry(worker)
            .or_default()
            .push((started, finished));
    }
    assert_eq!(
        by_worker.len(),
        2,
        "both workers executed runs: {by_worker:?}"
    );
    let overlap = by_worker["a"]
        .iter()
        .any(|(s1, f1)| by_worker["b"].iter().any(|(s2, f2)| s1 < f2 && s2 < f1));
    assert!(overlap, "the workers ran at the same time");
}

/// A pending run cancelled through the database layer never executes.
#[tokio::test]
async fn cancelled_pending_run_is_never_claimed() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let run = db
        .enqueue(tenant, vec![echo_run(json!({}))])
        .await
        .remove(0);
    let mut tx = db.pool.begin().await.expect("begin");
    let cancelled = runs::cancel(&mut tx, tenant, run.id).await.expect("cancel");
    tx.commit().await.expect("commit");
    assert_eq!(cancelled.status, RunStatus::Cancelled);

    let worker = Worker::new(db.new_pool(2), worker_config(1));
    assert!(worker.claim(10).await.expect("claim").is_empty());
    assert_eq!(
        event_types(&db, run.id).await,
        vec![EventType::Created, EventType::Cancelled]
    );
}

/// Numbers at the edges of f64 survive the round trip through `jsonb` (which
/// prints them in full decimal): a run holding them is claimed, executed and
/// read back with the same values. A number that read back out of range
/// used to fail the claim of every run batched with it.
#[tokio::test]
async fn extreme_numbers_round_trip_through_claim_and_read() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let extremes = json!({
        "max": f64::MAX, "min": f64::MIN, "tiny": 5e-324, "small": 2.2250738585072014e-308,
        "third": 1.0 / 3.0, "big_int": u64::MAX, "neg_int": i64::MIN,
    });
    let mut run = echo_run(extremes.clone());
    run.metadata = Some(extremes.clone());
    let runs = db
        .enqueue(tenant, vec![run, echo_run(json!({ "plain": 1 }))])
        .await;
    let worker = RunningWorker::start(Worker::new(db.new_pool(4), worker_config(2)));
    db.wait_all_terminal(Duration::from_secs(15)).await;
    worker.stop().await;
    let (extreme, _) = detail(&db, runs[0].id).await;
    assert_eq!(extreme.status, RunStatus::Succeeded);
    assert_eq!(extreme.metadata, extremes);
    assert_eq!(extreme.result, Some(extremes));
    assert_eq!(detail(&db, runs[1].id).await.0.status, RunStatus::Succeeded);
}
