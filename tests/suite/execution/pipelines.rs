//! Pipelines: steps in order, outputs, retries, failures, timeouts and bad steps.

use super::*;

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
