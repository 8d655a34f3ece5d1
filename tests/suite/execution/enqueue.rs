//! Enqueueing: runs and their outbox rows commit together, batches are complete and idempotent.

use super::*;

/// Invariant 3 (state and outbox together): a run enqueued in a transaction
/// that rolls back leaves neither the run nor its outbox row; one that
/// commits has both.
#[tokio::test]
async fn enqueue_commits_run_and_outbox_row_together() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let new = || runq_shared::NewRun::new(tenant, vec![NewStep::new("e", "echo", json!({}))]);

    let mut tx = db.pool.begin().await.expect("begin");
    runq_shared::enqueue(&mut tx, new()).await.expect("enqueue");
    tx.rollback().await.expect("rollback");
    assert_eq!(db.scalar::<i64>("SELECT count(*) FROM runs").await, 0);
    assert_eq!(db.scalar::<i64>("SELECT count(*) FROM outbox").await, 0);

    let mut tx = db.pool.begin().await.expect("begin");
    let run = runq_shared::enqueue(&mut tx, new())
        .await
        .expect("enqueue")
        .run;
    tx.commit().await.expect("commit");
    assert_eq!(event_types(&db, run.id).await, vec![EventType::Created]);
}

/// `enqueue_many` inserts every run with its steps and its `run.created` row,
/// in input order; a repeated idempotency key with the same request returns
/// the first run, and with a different request is refused.
#[tokio::test]
async fn enqueue_many_is_complete_and_idempotent() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let mut batch: Vec<runq_shared::NewRun> = (0..300)
        .map(|i| {
            runq_shared::NewRun::new(
                tenant,
                vec![
                    NewStep::new("e", "echo", json!({ "i": i })),
                    NewStep::new("f", "echo", json!({})),
                ],
            )
        })
        .collect();
    batch[7].idempotency_key = Some("order-7".into());
    let mut tx = db.pool.begin().await.expect("begin");
    let first = runq_shared::enqueue_many(&mut tx, batch)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    assert_eq!(first.len(), 300);
    assert!(first.iter().all(|e| e.created));

    let mut again = runq_shared::NewRun::new(
        tenant,
        vec![
            NewStep::new("e", "echo", json!({ "i": 7 })),
            NewStep::new("f", "echo", json!({})),
        ],
    );
    again.idempotency_key = Some("order-7".into());
    let mut conn = db.pool.acquire().await.expect("connection");
    let repeated = runq_shared::enqueue(&mut conn, again.clone())
        .await
        .expect("enqueue");
    assert!(!repeated.created);
    assert_eq!(repeated.run.id, first[7].run.id);
    again.run.steps[0].input = json!({ "i": 8 });
    let refused = runq_shared::enqueue(&mut conn, again).await;
    assert!(
        matches!(&refused, Err(runq_shared::DbError::IdempotencyMismatch(key)) if key == "order-7"),
        "a different request under a used key is refused: {refused:?}"
    );
    drop(conn);

    assert_eq!(db.scalar::<i64>("SELECT count(*) FROM runs").await, 300);
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM run_steps").await,
        600
    );
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM outbox WHERE event_type = 'run.created'")
            .await,
        300
    );
    let inputs: Vec<Value> = sqlx::query_scalar(
        "SELECT s.input FROM runs r JOIN run_steps s ON s.run_id = r.id AND s.position = 0 ORDER BY r.id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("inputs");
    let expected: Vec<Value> = (0..300).map(|i| json!({ "i": i })).collect();
    assert_eq!(
        inputs, expected,
        "ids follow input order (FIFO within a batch)"
    );
}

/// Regression for the seed system, which lost 43 jobs: they sat unclaimed
/// because their outbox row was missing and no notification came. Every
/// run, however it was inserted, has its `run.created` row; and a pending
/// run that no notification announces (a delayed run coming due) is claimed
/// by an idle worker within its poll interval.
#[tokio::test]
async fn no_run_lacks_its_created_row_and_idle_workers_claim_unannounced_runs() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let poll_ms = 300;
    let config = runq_shared::config::WorkerConfig {
        poll_interval_ms: poll_ms,
        ..crate::support::worker_config(4)
    };
    let worker = crate::support::RunningWorker::start(Worker::new(db.pool.clone(), config));
    let mut tx = db.pool.begin().await.expect("begin");
    runq_shared::enqueue(
        &mut tx,
        runq_shared::NewRun::new(tenant, vec![NewStep::new("e", "echo", json!({}))]),
    )
    .await
    .expect("enqueue");
    tx.commit().await.expect("commit");
    // Due 500 ms from now: its notification comes while it is not yet due,
    // so only the poll can find it.
    let mut delayed = echo_run(json!({}));
    delayed.run_at = Some(chrono::Utc::now() + chrono::Duration::milliseconds(500));
    let mut batch = vec![delayed];
    batch.extend((0..20).map(|i| echo_run(json!({ "i": i }))));
    db.enqueue(tenant, batch).await;
    db.wait_all_terminal(Duration::from_secs(20)).await;
    worker.stop().await;

    let orphans: i64 = db
        .scalar(
            "SELECT count(*) FROM runs r WHERE NOT EXISTS (
                 SELECT 1 FROM outbox o WHERE o.run_id = r.id AND o.event_type = 'run.created')",
        )
        .await;
    assert_eq!(orphans, 0, "runs without their run.created row");
    let waited_ms: f64 = db
        .scalar(
            "SELECT max(extract(epoch FROM started_at - run_at) * 1000)::float8
             FROM runs WHERE started_at IS NOT NULL",
        )
        .await;
    // One poll interval, plus slack for a loaded machine's scheduling.
    assert!(
        waited_ms < (poll_ms + 700) as f64,
        "a due run waited {waited_ms} ms for an idle worker polling every {poll_ms} ms"
    );
}
