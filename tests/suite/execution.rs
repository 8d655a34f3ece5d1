//! Executing pipelines: data flow between steps, checkpoints, failures,
//! retries, fencing and the outbox rows of every state change.

use std::time::Duration;

use runq_shared::db::outbox;
use runq_shared::db::runs;
use runq_shared::protocol::{Backoff, Checkpoint, CheckpointResult, Completion, Outcome};
use runq_shared::{CreateRun, EventType, NewStep, RunStatus};
use runq_worker::maintenance::Rescuer;
use runq_worker::Worker;
use serde_json::{json, Value};

use crate::support::handlers::{Count, Executions, FailOnce};
use crate::support::{check_invariants, echo_run, worker_config, RunningWorker, TestDb};

fn counting_worker(db: &TestDb, name: &str, executions: &Executions, concurrency: usize) -> Worker {
    Worker::new(db.new_pool(4), worker_config(concurrency))
        .register(Count {
            executions: executions.clone(),
            worker: name.to_owned(),
        })
        .register(FailOnce {
            executions: executions.clone(),
        })
}

async fn detail(db: &TestDb, id: uuid::Uuid) -> (runq_shared::Run, Vec<runq_shared::Step>) {
    let mut conn = db.pool.acquire().await.expect("connection");
    let run = runs::get(&mut conn, run_tenant(db, id).await, id)
        .await
        .expect("run");
    let steps = runq_shared::db::steps::list(&mut conn, run.tenant_id, id)
        .await
        .expect("steps");
    (run, steps)
}

async fn run_tenant(db: &TestDb, id: uuid::Uuid) -> uuid::Uuid {
    sqlx::query_scalar("SELECT tenant_id FROM runs WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("tenant")
}

async fn event_types(db: &TestDb, id: uuid::Uuid) -> Vec<EventType> {
    let mut conn = db.pool.acquire().await.expect("connection");
    outbox::for_run(&mut conn, id)
        .await
        .expect("outbox rows deserialise into OutboxEvent")
        .into_iter()
        .map(|row| row.payload.event_type)
        .collect()
}

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

/// A three-step pipeline hands each output on as `prev` (and all earlier ones
/// as `results`), and every step's output is stored.
#[tokio::test]
async fn three_step_pipeline_passes_prev_and_persists_each_output() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let executions = Executions::default();
    let worker = RunningWorker::start(counting_worker(&db, "w", &executions, 2));
    let run = db
        .enqueue(
            tenant,
            vec![CreateRun::new(vec![
                NewStep::new("first", "echo", json!({ "a": 1 })),
                NewStep::new("second", "echo", json!({ "b": 2 })),
                NewStep::new("third", "count", json!({})),
            ])],
        )
        .await
        .remove(0);

    db.wait_all_terminal(Duration::from_secs(10)).await;
    worker.stop().await;

    let (run, steps) = detail(&db, run.id).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(steps[0].output, Some(json!({ "a": 1 })));
    assert_eq!(
        steps[1].output,
        Some(json!({ "a": 1, "b": 2 })),
        "echo merges its input over prev"
    );
    let last = steps[2].output.clone().expect("third output");
    assert_eq!(last["prev"], json!({ "a": 1, "b": 2 }));
    assert_eq!(last["results"], json!([{ "a": 1 }, { "a": 1, "b": 2 }]));
    assert_eq!(run.result, Some(last));
    assert!(steps
        .iter()
        .all(|s| s.status == runq_shared::StepStatus::Succeeded && s.attempt == 1));
    assert_eq!(
        event_types(&db, run.id).await,
        vec![EventType::Created, EventType::Started, EventType::Succeeded]
    );
}

/// Step 2 of 3 fails on every attempt: step 3 never starts; after the last
/// attempt the run and step 2 are failed, with the error and attempts recorded.
/// Step 1 is checkpointed and not executed again on the retry.
#[tokio::test]
async fn failing_second_step_stops_pipeline_and_fails_after_last_attempt() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let executions = Executions::default();
    let worker = RunningWorker::start(counting_worker(&db, "w", &executions, 2));
    let mut create = CreateRun::new(vec![
        NewStep::new("one", "count", json!({})),
        NewStep::new("two", "fail", json!({ "message": "target said no" })),
        NewStep::new("three", "count", json!({})),
    ]);
    create.max_attempts = 2;
    let run = db.enqueue(tenant, vec![create]).await.remove(0);

    db.wait_all_terminal(Duration::from_secs(10)).await;
    worker.stop().await;

    let (run, steps) = detail(&db, run.id).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.attempt, 2);
    let error = run.error.expect("error");
    assert_eq!(error["reason"], "step_failed");
    assert_eq!(error["message"], "target said no");
    assert_eq!(error["position"], 1);
    assert_eq!(steps[1].status, runq_shared::StepStatus::Failed);
    assert_eq!(steps[1].attempt, 2);
    assert_eq!(
        steps[1].error.as_ref().map(|e| e["message"].clone()),
        Some(json!("target said no"))
    );
    assert_eq!(steps[2].status, runq_shared::StepStatus::Pending);
    assert_eq!(executions.count(run.id, 2), 0, "step 3 never started");
    assert_eq!(
        executions.count(run.id, 0),
        1,
        "step 1 checkpointed, not repeated"
    );
    assert_eq!(
        event_types(&db, run.id).await,
        vec![
            EventType::Created,
            EventType::Started,
            EventType::Retrying,
            EventType::Started,
            EventType::Failed
        ]
    );
}

/// Metadata given at creation reaches every step and is unchanged at the end.
#[tokio::test]
async fn metadata_is_visible_to_every_step_and_unchanged() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let executions = Executions::default();
    let worker = RunningWorker::start(counting_worker(&db, "w", &executions, 2));
    let metadata = json!({ "customer": "ünïcødé 🚀", "nested": { "list": [1, 2, 3] }, "quote": "'; DROP TABLE runs; --" });
    let mut create = CreateRun::new(
        (0..3)
            .map(|i| NewStep::new(format!("s{i}"), "count", json!({})))
            .collect(),
    );
    create.metadata = Some(metadata.clone());
    let run = db.enqueue(tenant, vec![create]).await.remove(0);

    db.wait_all_terminal(Duration::from_secs(10)).await;
    worker.stop().await;

    let (run, steps) = detail(&db, run.id).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    for step in &steps {
        assert_eq!(
            step.output.as_ref().map(|o| o["metadata"].clone()),
            Some(metadata.clone())
        );
    }
    assert_eq!(run.metadata, metadata);
}

/// Invariant 5 (checkpoints): a run whose step 2 failed once resumes at step 2
/// on the retry; step 1 is not executed again.
#[tokio::test]
async fn retried_run_resumes_at_first_unfinished_step() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let executions = Executions::default();
    let worker = RunningWorker::start(counting_worker(&db, "w", &executions, 2));
    let run = db
        .enqueue(
            tenant,
            vec![CreateRun::new(vec![
                NewStep::new("one", "count", json!({})),
                NewStep::new("two", "fail_once", json!({})),
                NewStep::new("three", "count", json!({})),
            ])],
        )
        .await
        .remove(0);

    db.wait_all_terminal(Duration::from_secs(10)).await;
    worker.stop().await;

    let (run, steps) = detail(&db, run.id).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.attempt, 2);
    assert_eq!(executions.count(run.id, 0), 1, "step 1 ran once");
    assert_eq!(
        executions.count(run.id, 1),
        2,
        "step 2 ran on both attempts"
    );
    assert_eq!(executions.count(run.id, 2), 1);
    assert_eq!(steps[0].attempt, 1, "step 1 finished on attempt 1");
    assert_eq!(steps[1].attempt, 2);
    assert_eq!(steps[1].output, Some(json!({ "recovered_on_attempt": 2 })));
    let third = steps[2].output.clone().expect("output");
    assert_eq!(third["results"][1], json!({ "recovered_on_attempt": 2 }));
}

/// Invariant 1 (fencing): a worker whose lease expired and was taken over
/// cannot overwrite the new owner's result, nor checkpoint a step.
#[tokio::test]
async fn stale_worker_cannot_overwrite_new_owner() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let run = db
        .enqueue(
            tenant,
            vec![CreateRun::new(vec![
                NewStep::new("one", "echo", json!({})),
                NewStep::new("two", "echo", json!({})),
            ])],
        )
        .await
        .remove(0);
    let backoff = Backoff {
        base_ms: 0.0,
        max_ms: 0.0,
    };
    let (stale, fresh) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let mut conn = db.pool.acquire().await.expect("connection");
    let queues = vec!["default".to_owned()];
    let first = runs::claim(&mut conn, stale, &queues, 1, 30_000)
        .await
        .expect("claim")
        .remove(0);

    // The stale worker stalls past its lease; the rescuer hands the run on.
    db.execute("UPDATE runs SET lease_expires_at = now() - interval '1 second'")
        .await;
    let report = Rescuer::new(db.pool.clone(), backoff, 60_000)
        .run_once()
        .await
        .expect("rescue");
    assert_eq!(report.retried, 1);
    db.execute("UPDATE runs SET run_at = now()").await;
    let second = runs::claim(&mut conn, fresh, &queues, 1, 30_000)
        .await
        .expect("claim")
        .remove(0);
    assert_eq!(second.lease.attempt, 2);

    let stale_lease = first.lease;
    let checkpoint = Checkpoint {
        lease: stale_lease,
        position: 0,
        output: json!({ "from": "stale" }),
        started_at: chrono::Utc::now(),
    };
    let refused = runs::checkpoint_many(&mut conn, &[checkpoint], &[])
        .await
        .expect("checkpoint");
    assert_eq!(refused, vec![CheckpointResult::LeaseLost]);
    let finish = |lease, who: &str| Completion {
        lease,
        outcome: Outcome::Succeeded {
            position: 1,
            output: json!({ "from": who }),
            started_at: chrono::Utc::now(),
        },
    };
    let written = runs::complete_many(&mut conn, &[finish(stale_lease, "stale")], &[], backoff)
        .await
        .expect("complete");
    assert!(written.is_empty(), "the stale completion is refused");
    let written = runs::complete_many(&mut conn, &[finish(second.lease, "fresh")], &[], backoff)
        .await
        .expect("complete");
    assert_eq!(written, vec![run.id]);
    drop(conn);

    let (run, steps) = detail(&db, run.id).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.result, Some(json!({ "from": "fresh" })));
    assert_eq!(steps[0].output, None, "the stale checkpoint wrote nothing");
    let terminal = event_types(&db, run.id)
        .await
        .into_iter()
        .filter(|t| *t == EventType::Succeeded)
        .count();
    assert_eq!(terminal, 1, "one terminal outbox row, the new owner's");
}

/// Invariant 1 (a fence that never repeats): a retry resets `attempt` to 0,
/// so after a client's retry the same worker's new claim has the same
/// `(locked_by, attempt)` as its claim of the run's earlier life. A write
/// still in flight from that earlier life must not land in the new one.
#[tokio::test]
async fn write_from_a_runs_earlier_life_is_refused_after_a_retry() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let mut one_attempt = echo_run(json!({}));
    one_attempt.max_attempts = 1;
    let run = db.enqueue(tenant, vec![one_attempt]).await.remove(0);
    let backoff = Backoff {
        base_ms: 0.0,
        max_ms: 0.0,
    };
    let worker = uuid::Uuid::now_v7();
    let queues = vec!["default".to_owned()];
    let mut conn = db.pool.acquire().await.expect("connection");
    let earlier = runs::claim(&mut conn, worker, &queues, 1, 30_000)
        .await
        .expect("claim")
        .remove(0);
    // The worker stalls; its lease expires and the run fails (one attempt).
    db.execute("UPDATE runs SET lease_expires_at = now() - interval '1 second'")
        .await;
    let report = Rescuer::new(db.pool.clone(), backoff, 60_000)
        .run_once()
        .await
        .expect("rescue");
    assert_eq!(report.failed, 1);
    let mut tx = db.pool.begin().await.expect("begin");
    runs::retry(&mut tx, tenant, run.id).await.expect("retry");
    tx.commit().await.expect("commit");
    let later = runs::claim(&mut conn, worker, &queues, 1, 30_000)
        .await
        .expect("claim")
        .remove(0);
    assert_eq!(
        later.lease.attempt, earlier.lease.attempt,
        "the user-visible attempt repeats after a retry"
    );
    assert!(
        later.lease.token > earlier.lease.token,
        "the fence does not"
    );

    let late = Completion {
        lease: earlier.lease,
        outcome: Outcome::Succeeded {
            position: 0,
            output: json!({ "from": "earlier life" }),
            started_at: chrono::Utc::now(),
        },
    };
    let written = runs::complete_many(&mut conn, &[late], &[], backoff)
        .await
        .expect("complete");
    assert!(written.is_empty(), "the earlier life's write is refused");
    let checkpoint = Checkpoint {
        lease: earlier.lease,
        position: 0,
        output: json!({ "from": "earlier life" }),
        started_at: chrono::Utc::now(),
    };
    let refused = runs::checkpoint_many(&mut conn, &[checkpoint], &[])
        .await
        .expect("checkpoint");
    assert_eq!(refused, vec![CheckpointResult::LeaseLost]);
    let held = runs::extend_leases(&mut conn, &[earlier.lease], 30_000)
        .await
        .expect("heartbeat");
    assert!(held.is_empty(), "nor can it extend the new life's lease");
    drop(conn);

    let (run, _) = detail(&db, run.id).await;
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.result, None);
    assert_eq!(
        run.errors.len(),
        1,
        "the earlier life's expiry is in the history"
    );
    assert_eq!(run.errors[0].reason, runq_shared::ErrorReason::LeaseExpired);
    assert_eq!(run.errors[0].worker_id, Some(worker));
}

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

/// A step kind no handler is registered for fails the step with a clear reason.
#[tokio::test]
async fn unknown_step_kind_fails_with_reason() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let worker = RunningWorker::start(Worker::new(db.new_pool(4), worker_config(2)));
    let mut create = CreateRun::new(vec![NewStep::new("x", "teleport", json!({}))]);
    create.max_attempts = 1;
    let run = db.enqueue(tenant, vec![create]).await.remove(0);

    db.wait_all_terminal(Duration::from_secs(10)).await;
    worker.stop().await;

    let (run, _) = detail(&db, run.id).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.error.expect("error")["reason"], "unknown_step_kind");
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

/// A step's own timeout fails the step (reason `step_timeout`) and is retried
/// like any failure until attempts run out.
#[tokio::test]
async fn step_timeout_counts_as_a_retried_failure() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let worker = RunningWorker::start(Worker::new(db.new_pool(4), worker_config(2)));
    let mut slow = NewStep::new("slow", "sleep", json!({ "ms": 30_000 }));
    slow.timeout_seconds = Some(1);
    let mut create = CreateRun::new(vec![slow]);
    create.max_attempts = 2;
    let run = db.enqueue(tenant, vec![create]).await.remove(0);

    db.wait_all_terminal(Duration::from_secs(20)).await;
    worker.stop().await;

    let (run, steps) = detail(&db, run.id).await;
    assert_eq!((run.status, run.attempt), (RunStatus::Failed, 2));
    assert_eq!(run.error.expect("error")["reason"], "step_timeout");
    assert_eq!(
        steps[0].error.as_ref().map(|e| e["reason"].clone()),
        Some(json!("step_timeout"))
    );
    assert_eq!(
        event_types(&db, run.id).await,
        vec![
            EventType::Created,
            EventType::Started,
            EventType::Retrying,
            EventType::Started,
            EventType::Failed
        ]
    );
}

/// A cancel request wins over every way out of `running` that would put the
/// run back in the queue: a failed attempt with attempts left and a
/// shutting-down worker's hand-back both end it `cancelled` (with their
/// outbox row), and no pending run can carry a cancel request, so a claim
/// never hands one out.
#[tokio::test]
async fn cancel_request_wins_over_retry_and_hand_back() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let runs = db
        .enqueue(tenant, vec![echo_run(json!({})), echo_run(json!({}))])
        .await;
    let backoff = Backoff {
        base_ms: 0.0,
        max_ms: 0.0,
    };
    let mut conn = db.pool.acquire().await.expect("connection");
    let claimed = runs::claim(
        &mut conn,
        uuid::Uuid::now_v7(),
        &["default".to_owned()],
        2,
        30_000,
    )
    .await
    .expect("claim");
    let mut tx = db.pool.begin().await.expect("begin");
    for run in &runs {
        runs::cancel(&mut tx, tenant, run.id).await.expect("cancel");
    }
    tx.commit().await.expect("commit");
    let (failing, releasing) = match claimed[0].id() == runs[0].id {
        true => (claimed[0].lease, claimed[1].lease),
        false => (claimed[1].lease, claimed[0].lease),
    };
    let failed = Completion {
        lease: failing,
        outcome: Outcome::Failed {
            step: None,
            error: runq_shared::RunError::new(runq_shared::ErrorReason::StepFailed, "no", None),
        },
    };
    runs::complete_many(&mut conn, &[failed], &[], backoff)
        .await
        .expect("complete");
    runs::release_many(&mut conn, &[releasing])
        .await
        .expect("release");
    let pending_with_request = sqlx::query(
        "UPDATE runs SET status = 'pending', locked_by = NULL, lease_expires_at = NULL,
         cancel_requested = true WHERE id = $1",
    )
    .bind(runs[0].id)
    .execute(&mut *conn)
    .await;
    assert!(
        pending_with_request.is_err(),
        "a pending run cannot carry a cancel request"
    );
    drop(conn);

    for (run, attempt) in [(&runs[0], 1), (&runs[1], 1)] {
        let (run, _) = detail(&db, run.id).await;
        assert_eq!((run.status, run.attempt), (RunStatus::Cancelled, attempt));
        assert_eq!(
            event_types(&db, run.id).await,
            vec![EventType::Created, EventType::Started, EventType::Cancelled]
        );
    }
    check_invariants(&db).await;
}

/// A step's input is handed to its handler as given (the API checks only
/// what the spec states); a built-in handler that cannot use its input fails
/// the step with a reason naming what is wrong, and no request leaves for a
/// URL that is not http(s).
#[tokio::test]
async fn built_in_steps_fail_on_input_they_cannot_use() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let one = |kind: &str, input: Value| {
        let mut run = CreateRun::new(vec![NewStep::new("s", kind, input)]);
        run.max_attempts = 1;
        run
    };
    let runs = db
        .enqueue(
            tenant,
            vec![
                one("http", json!({})),
                one("http", json!({ "url": "file:///etc/passwd" })),
                one("sleep", json!({ "ms": -1 })),
            ],
        )
        .await;
    let worker = RunningWorker::start(Worker::new(db.new_pool(4), worker_config(3)));
    db.wait_all_terminal(Duration::from_secs(15)).await;
    worker.stop().await;
    let mut messages = Vec::new();
    for run in &runs {
        let (run, _) = detail(&db, run.id).await;
        assert_eq!(run.status, RunStatus::Failed);
        let error = run.error.expect("error");
        assert_eq!(error["reason"], "step_failed", "{error}");
        messages.push(error["message"].as_str().unwrap_or_default().to_owned());
    }
    assert!(messages[0].contains("input.url"), "{messages:?}");
    assert!(messages[1].contains("file:///etc/passwd"), "{messages:?}");
    assert!(messages[2].contains("input.ms"), "{messages:?}");
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
