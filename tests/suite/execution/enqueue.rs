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
