//! Faults stay where they start (DESIGN.md, invariant 7), from inside the
//! worker: a write the database refuses, an executor that panics, an output
//! past the size cap each cost their own run alone. Also what a client sees
//! of it: the attempt history, and idempotency keys that refuse a different
//! request.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use runq_shared::config::WorkerConfig;
use runq_shared::{CreateRun, ErrorReason, NewStep, Problem, Run, RunDetail, RunStatus};
use runq_worker::Worker;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::handlers::{Big, PanicOnDrop};
use crate::support::target::Target;
use crate::support::{
    check_invariants, echo_run, token, worker_config, RunningWorker, TestApi, TestDb,
};

/// One attempt-history entry without its time: attempt, reason, step,
/// worker, message.
type Attempt = (i32, ErrorReason, Option<i32>, Option<Uuid>, String);

async fn run(db: &TestDb, id: Uuid) -> Run {
    let tenant: Uuid = sqlx::query_scalar("SELECT tenant_id FROM runs WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("tenant");
    let mut conn = db.pool.acquire().await.expect("connection");
    runq_shared::db::runs::get(&mut conn, tenant, id)
        .await
        .expect("run")
}

/// Runs of `ids` started more than once (`run.started` outbox rows).
async fn started_twice(db: &TestDb, ids: &[Uuid]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT run_id FROM outbox WHERE event_type = 'run.started'
           AND run_id = ANY($1) GROUP BY run_id HAVING count(*) > 1) twice",
    )
    .bind(ids)
    .fetch_one(&db.pool)
    .await
    .expect("count")
}

/// Invariant 7: a write the database refuses for one run (here a trigger
/// that rejects a poisoned step output, standing for any constraint a value
/// can break after the worker's own checks) is isolated by splitting the
/// completer's batch: that run's attempt ends `write_refused` with the
/// database's reason, and every run batched with it, as a completion or a
/// checkpoint, is written once, on its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_refusing_one_write_costs_only_that_run() {
    let db = TestDb::new().await;
    db.execute(
        r#"CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.output ? 'poison' THEN
               RAISE EXCEPTION 'poisoned output refused by a test trigger';
             END IF;
             RETURN NEW;
           END $$"#,
    )
    .await;
    db.execute(
        "CREATE TRIGGER refuse_poison BEFORE UPDATE ON run_steps
         FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    )
    .await;
    let tenant = db.tenant("acme").await;
    let runs: Vec<CreateRun> = (0..400)
        .map(|i| {
            let mut run = if i % 50 == 7 {
                // Refused as a run's final outcome.
                echo_run(json!({ "poison": true, "i": i }))
            } else if i % 50 == 31 {
                // Refused as a checkpoint, with a step after it.
                CreateRun::new(vec![
                    NewStep::new("a", "echo", json!({ "poison": true, "i": i })),
                    NewStep::new("b", "echo", json!({})),
                ])
            } else {
                CreateRun::new(vec![
                    NewStep::new("a", "echo", json!({ "i": i })),
                    NewStep::new("b", "echo", json!({ "done": true })),
                ])
            };
            run.max_attempts = 1;
            run
        })
        .collect();
    let enqueued = db.enqueue(tenant, runs).await;
    let started = Instant::now();
    let worker = RunningWorker::start(Worker::new(db.new_pool(8), worker_config(50)));
    db.wait_all_terminal(Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    worker.stop().await;

    let mut refused = 0;
    for (i, queued) in enqueued.iter().enumerate() {
        let run = run(&db, queued.id).await;
        if i % 50 == 7 || i % 50 == 31 {
            refused += 1;
            assert_eq!(run.status, RunStatus::Failed, "run {i}");
            let error = run.error.expect("error");
            assert_eq!(error["reason"], "write_refused", "run {i}: {error}");
            let message = error["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("poisoned output refused by a test trigger"),
                "run {i}: the database's reason is kept: {message}"
            );
        } else {
            assert_eq!(
                (run.status, run.attempt),
                (RunStatus::Succeeded, 1),
                "run {i} paid for another run's bad write: {:?}",
                run.error
            );
        }
    }
    assert_eq!(refused, 16);
    let ids: Vec<Uuid> = enqueued.iter().map(|r| r.id).collect();
    assert_eq!(started_twice(&db, &ids).await, 0, "no run executed twice");
    assert!(
        elapsed < Duration::from_secs(20),
        "nothing waited for a 30 s lease to expire ({elapsed:?})"
    );
    check_invariants(&db).await;
}

/// Invariant 7: an executor that panics (here a handler's guard that panics
/// when the step timeout drops it, outside the handler's own panic catching)
/// fails its attempt at once with reason `executor_panicked`, instead of
/// keeping its lease until the process exits or the lease expires; the
/// worker goes on executing other runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_panic_fails_the_attempt_at_once() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let mut doomed = CreateRun::new(vec![NewStep {
        timeout_seconds: Some(1),
        ..NewStep::new("boom", "panic_on_drop", json!({}))
    }]);
    doomed.max_attempts = 1;
    let runs = db
        .enqueue(tenant, vec![doomed, echo_run(json!({ "fine": true }))])
        .await;
    // A 60 s lease: a run left held would sit `running` far past the wait.
    let config = WorkerConfig {
        lease_ms: 60_000,
        ..worker_config(2)
    };
    let worker = RunningWorker::start(Worker::new(db.new_pool(4), config).register(PanicOnDrop));
    db.wait_all_terminal(Duration::from_secs(15)).await;
    let report = worker.stop().await;

    let doomed = run(&db, runs[0].id).await;
    assert_eq!(doomed.status, RunStatus::Failed);
    let error = doomed.error.expect("error");
    assert_eq!(error["reason"], "executor_panicked", "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("guard panicked")),
        "{error}"
    );
    assert_eq!(doomed.errors.len(), 1);
    assert_eq!(doomed.errors[0].reason, ErrorReason::ExecutorPanicked);
    assert_eq!(run(&db, runs[1].id).await.status, RunStatus::Succeeded);
    assert_eq!((report.claimed, report.finished), (2, 2));
    check_invariants(&db).await;
}

/// Unbounded replies (issue item 7): with `RUNQ_MAX_OUTPUT_BYTES` at
/// 10,000, an `http` reply over the cap fails its step whether its size is
/// declared or only found by reading, and so do a handler's output and
/// events over it, all with reason `output_too_large`; replies and outputs
/// under the cap are stored whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_outputs_over_the_cap_fail_their_step() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let target = Target::start();
    let one = |kind: &str, input: Value| {
        let mut run = CreateRun::new(vec![NewStep::new("s", kind, input)]);
        run.max_attempts = 1;
        run
    };
    let url = |bytes: usize, chunked: bool| json!({ "url": format!("{}?bytes={bytes}&chunked={chunked}", target.big_url) });
    let runs = db
        .enqueue(
            tenant,
            vec![
                one("http", url(20_000, false)),
                one("http", url(20_000, true)),
                one("http", url(5_000, true)),
                one("big", json!({ "bytes": 20_000 })),
                one("big", json!({ "bytes": 20_000, "as_event": true })),
                one("big", json!({ "bytes": 5_000 })),
            ],
        )
        .await;
    let config = WorkerConfig {
        max_output_bytes: 10_000,
        ..worker_config(4)
    };
    let worker = RunningWorker::start(Worker::new(db.new_pool(4), config).register(Big));
    db.wait_all_terminal(Duration::from_secs(15)).await;
    worker.stop().await;

    let mut outcomes = Vec::new();
    for queued in &runs {
        let run = run(&db, queued.id).await;
        let reason = run.error.as_ref().map(|e| e["reason"].clone());
        outcomes.push((run.status, reason));
    }
    let too_large = || (RunStatus::Failed, Some(json!("output_too_large")));
    assert_eq!(
        outcomes,
        vec![
            too_large(),
            too_large(),
            (RunStatus::Succeeded, None),
            too_large(),
            too_large(),
            (RunStatus::Succeeded, None),
        ]
    );
    for queued in &runs[..2] {
        let error = run(&db, queued.id).await.error.expect("error");
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("over the cap of 10000")),
            "{error}"
        );
    }
    let stored = run(&db, runs[2].id).await.result.expect("result");
    assert_eq!(stored["body"].as_str().map(str::len), Some(5_000));
    let events: i64 = db
        .scalar("SELECT count(*) FROM run_events WHERE kind = 'blob'")
        .await;
    assert_eq!(events, 0, "the oversized event was not stored");
    check_invariants(&db).await;
}

/// Attempt history: each attempt that ended without success is kept (attempt,
/// time, reason, message, step, worker) and returned by `GET /v1/runs/{id}`,
/// oldest first, across a client's retry.
#[tokio::test]
async fn run_detail_shows_every_failed_attempt() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let token = token(&db, tenant).await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let client = reqwest::Client::new();
    let mut failing = CreateRun::new(vec![
        NewStep::new("ok", "echo", json!({})),
        NewStep::new("no", "fail", json!({ "message": "no luck" })),
    ]);
    failing.max_attempts = 2;
    let id = db.enqueue(tenant, vec![failing]).await[0].id;
    let worker = RunningWorker::start(Worker::new(db.new_pool(4), worker_config(1)));
    let worker_id = worker.id;
    db.wait_all_terminal(Duration::from_secs(15)).await;
    let mut tx = db.pool.begin().await.expect("begin");
    runq_shared::db::runs::retry(&mut tx, tenant, id)
        .await
        .expect("retry");
    tx.commit().await.expect("commit");
    db.wait_all_terminal(Duration::from_secs(15)).await;
    worker.stop().await;

    let detail: RunDetail = client
        .get(format!("{}/v1/runs/{id}", api.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("run detail");
    let history: Vec<Attempt> = detail
        .run
        .errors
        .iter()
        .map(|e| {
            (
                e.attempt,
                e.reason,
                e.position,
                e.worker_id,
                e.message.clone(),
            )
        })
        .collect();
    let failure = |attempt| {
        (
            attempt,
            ErrorReason::StepFailed,
            Some(1),
            Some(worker_id),
            "no luck".to_owned(),
        )
    };
    assert_eq!(
        history,
        vec![failure(1), failure(2), failure(1), failure(2)],
        "two attempts, a retry, two more"
    );
    assert!(detail
        .run
        .errors
        .windows(2)
        .all(|pair| pair[0].at <= pair[1].at));
    assert_eq!(detail.run.status, RunStatus::Failed);
}

/// Idempotency keys (issue item 9): a repeated key with the same request
/// (whatever the order of its object keys, with defaults spelled out or
/// not) returns the first run with 200; with a different request it is a
/// 422 naming the key, and nothing is inserted.
#[tokio::test]
async fn repeated_idempotency_key_with_a_different_request_is_refused() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let token = token(&db, tenant).await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let client = reqwest::Client::new();
    let send = |body: &'static str| {
        client
            .post(format!("{}/v1/runs", api.base))
            .bearer_auth(&token)
            .header("Idempotency-Key", "order-42")
            .header("Content-Type", "application/json")
            .body(body)
            .send()
    };
    let first = send(r#"{"metadata": {"a": 1, "b": 2}, "steps": [{"name": "e", "kind": "echo"}]}"#)
        .await
        .expect("send");
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Run = first.json().await.expect("run");
    let same = send(
        r#"{"steps": [{"kind": "echo", "name": "e", "input": null}], "queue": "default",
            "max_attempts": 3, "metadata": {"b": 2, "a": 1}}"#,
    )
    .await
    .expect("send");
    assert_eq!(same.status(), StatusCode::OK);
    let same: Run = same.json().await.expect("run");
    assert_eq!(same.id, first.id);

    for different in [
        r#"{"metadata": {"a": 1, "b": 3}, "steps": [{"name": "e", "kind": "echo"}]}"#,
        r#"{"metadata": {"a": 1, "b": 2}, "steps": [{"name": "e", "kind": "echo"}], "priority": 1}"#,
    ] {
        let refused = send(different).await.expect("send");
        assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            refused
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/problem+json")
        );
        let problem: Problem = refused.json().await.expect("problem");
        assert!(
            problem.detail.contains("order-42") && problem.detail.contains("different"),
            "{}",
            problem.detail
        );
    }
    let count: i64 = db.scalar("SELECT count(*) FROM runs").await;
    assert_eq!(count, 1);
}

/// A `\u0000` in the list's `queue` query parameter matches nothing, since
/// no stored queue name can hold one: the answer is an empty page, not the
/// 500 Postgres's refusal of the parameter used to become. In bulk retry's
/// body it is a 422 naming `queue`, as in every request body. No run is
/// touched either way.
#[tokio::test]
async fn nul_in_a_queue_filter_matches_nothing() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let token = token(&db, tenant).await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let client = reqwest::Client::new();
    db.enqueue(tenant, vec![echo_run(json!({}))]).await;
    db.execute("UPDATE runs SET status = 'failed', finished_at = now()")
        .await;

    let listed = client
        .get(format!("{}/v1/runs?queue=de%00fault", api.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("list");
    assert_eq!(listed.status(), StatusCode::OK);
    let page: Value = listed.json().await.expect("page");
    assert_eq!(page["runs"], json!([]));

    let retried = client
        .post(format!("{}/v1/runs/retry", api.base))
        .bearer_auth(&token)
        .json(&json!({ "queue": "de\u{0}fault" }))
        .send()
        .await
        .expect("retry");
    assert_eq!(retried.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = retried.json().await.expect("problem");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.starts_with("queue contains \\u0000"), "{detail}");
    assert_eq!(
        db.count_status("failed").await,
        1,
        "the failed run is untouched"
    );
}
