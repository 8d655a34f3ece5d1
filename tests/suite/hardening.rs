//! Hardening: one test per DESIGN.md invariant that a fault used to break.
//! Bad data in one run must not cost its batch (7), a duration cap counts
//! execution only (8), a worker cut off from Postgres stops acting before its
//! lease could expire (1), and the API and the rescuer refuse what they must.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use reqwest::StatusCode;
use runq_shared::config::WorkerConfig;
use runq_shared::db::runs;
use runq_shared::{CreateRun, NewStep, Problem};
use runq_worker::Worker;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::process::Proc;
use crate::support::proxy::Proxy;
use crate::support::target::Target;
use crate::support::{
    check_invariants, echo_run, held_by, outbox_types, status_and_attempt, token, wait_for_value,
    worker_config, worker_id_of, RunningWorker, TestApi, TestDb,
};

/// Runs of `ids` that match `condition` (a predicate on `runs` aliased `r`),
/// with their status, attempt and error, for assertion messages.
async fn offenders(
    db: &TestDb,
    ids: &[Uuid],
    condition: &str,
) -> Vec<(Uuid, String, i32, Option<Value>)> {
    sqlx::query_as(&format!(
        "SELECT r.id, r.status::text, r.attempt, r.error FROM runs r
         WHERE r.id = ANY($1) AND ({condition}) ORDER BY r.id LIMIT 5"
    ))
    .bind(ids)
    .fetch_all(&db.pool)
    .await
    .expect("offenders")
}

/// Invariant 7 (faults stay where they start): 20 runs whose `http` step
/// gets a reply Postgres cannot store (`\u0000` in `jsonb`), spread through
/// a batch of 1,000, on two worker processes. Each bad run fails alone with
/// a reason; every other run succeeds on its first attempt, is started once,
/// and none waits for a lease to expire, whether the bad value reaches the
/// completer as a final result or as a checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_step_output_fails_its_run_alone() {
    // Long enough that a loaded CI machine finishes well within one lease,
    // short enough that a run left to expire would show in the time taken.
    const LEASE_MS: u64 = 8_000;
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let target = Target::start();
    let bad = |i: usize| {
        let call = NewStep::new("call", "http", json!({ "url": target.unstorable_url }));
        // Half end on the bad reply (a completion), half go on after it (a
        // checkpoint): both writes are batched with other runs'.
        if i % 100 == 25 {
            CreateRun::new(vec![call])
        } else {
            CreateRun::new(vec![call, NewStep::new("after", "echo", json!({}))])
        }
    };
    let batch: Vec<CreateRun> = (0..1_000)
        .map(|i| {
            if i % 50 == 25 {
                bad(i)
            } else {
                echo_run(json!({ "i": i }))
            }
        })
        .collect();
    let enqueued = db.enqueue(tenant, batch).await;
    let (bad_ids, good_ids): (Vec<Uuid>, Vec<Uuid>) = {
        let (bad, good): (Vec<_>, Vec<_>) =
            enqueued.iter().enumerate().partition(|(i, _)| i % 50 == 25);
        (
            bad.into_iter().map(|(_, r)| r.id).collect(),
            good.into_iter().map(|(_, r)| r.id).collect(),
        )
    };
    assert_eq!((bad_ids.len(), good_ids.len()), (20, 980));

    let lease = LEASE_MS.to_string();
    let env = [
        ("RUNQ_LEASE_MS", lease.as_str()),
        ("RUNQ_HEARTBEAT_MS", "300"),
        ("RUNQ_CONCURRENCY", "10"),
    ];
    let started = Instant::now();
    let mut workers = [Proc::worker(&db.url, &env), Proc::worker(&db.url, &env)];
    db.wait_all_terminal(Duration::from_secs(60)).await;
    let took = started.elapsed();
    for worker in &mut workers {
        assert!(worker.stop().await.success());
    }

    let paid: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runs WHERE id = ANY($1) AND (status <> 'succeeded' OR attempt <> 1)",
    )
    .bind(&good_ids)
    .fetch_one(&db.pool)
    .await
    .expect("count");
    let lost = offenders(&db, &good_ids, "r.status <> 'succeeded' OR r.attempt <> 1").await;
    assert!(
        lost.is_empty(),
        "{paid} of 980 good runs paid for the bad ones; the first (status, attempt, error): {lost:?}"
    );
    let twice: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT run_id, count(*) FROM outbox
         WHERE event_type = 'run.started' AND run_id = ANY($1)
         GROUP BY run_id HAVING count(*) <> 1 LIMIT 5",
    )
    .bind(&good_ids)
    .fetch_all(&db.pool)
    .await
    .expect("started rows");
    assert!(
        twice.is_empty(),
        "good runs started more than once: {twice:?}"
    );
    let expired: i64 = db
        .scalar(
            "SELECT count(*) FROM outbox o
             WHERE runq_outbox_event(o)->'run'->'error'->>'reason' = 'lease_expired'",
        )
        .await;
    assert_eq!(expired, 0, "no run waited for a lease to expire");

    let bad_rows: Vec<(Uuid, String, Option<Value>)> =
        sqlx::query_as("SELECT id, status::text, error FROM runs WHERE id = ANY($1)")
            .bind(&bad_ids)
            .fetch_all(&db.pool)
            .await
            .expect("bad runs");
    for (id, status, error) in &bad_rows {
        assert_eq!(status, "failed", "bad run {id}: {error:?}");
        let error = error.as_ref().expect("a failed run has an error");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "bad run {id} says why: {error}");
        assert_ne!(
            error["reason"], "lease_expired",
            "bad run {id} was refused, not left to expire: {error}"
        );
    }
    assert!(
        took < Duration::from_millis(LEASE_MS),
        "the batch took {took:?}, as long as a lease ({LEASE_MS} ms)"
    );
    check_invariants(&db).await;
}

/// `None` if `response` is a 422 problem+json whose detail names every one
/// of `names`; else what came back instead.
async fn refusal_mismatch(response: reqwest::Response, names: &[&str]) -> Option<String> {
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.unwrap_or_default();
    let named = serde_json::from_str::<Problem>(&text)
        .is_ok_and(|p| names.iter().all(|name| p.detail.contains(name)));
    if status == StatusCode::UNPROCESSABLE_ENTITY
        && content_type == "application/problem+json"
        && named
    {
        None
    } else {
        Some(format!("{status} {content_type} {text}"))
    }
}

/// Bad input (DESIGN.md, Bad input; invariant 7): `\u0000`, which Postgres
/// cannot store in `text` or `jsonb`, in a metadata value or key, a step's
/// (nested) input, a step name or a queue, is refused with a 422 naming the
/// field, in `POST /v1/runs` and in `POST /v1/runs/batch` (naming the run),
/// and nothing is inserted.
#[tokio::test]
async fn api_refuses_unstorable_text_with_422_naming_the_field() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let token = token(&db, tenant).await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());
    let client = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        client
            .post(format!("{}{path}", api.base))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let echo = json!({ "name": "e", "kind": "echo", "input": {} });
    let nul = "a\u{0}b";
    // (what is bad, the body, the field the refusal must name)
    let cases = [
        (
            "a metadata value",
            json!({ "metadata": { "note": nul }, "steps": [echo] }),
            "metadata",
        ),
        (
            "a metadata key",
            json!({ "metadata": { nul: 1 }, "steps": [echo] }),
            "metadata",
        ),
        (
            "a nested step input",
            json!({ "steps": [echo, { "name": "x", "kind": "echo",
                                      "input": { "deep": [{ "text": nul }] } }] }),
            "steps[1].input",
        ),
        (
            "a step name",
            json!({ "steps": [{ "name": nul, "kind": "echo", "input": {} }] }),
            "steps[0].name",
        ),
        (
            "the queue",
            json!({ "queue": nul, "steps": [echo] }),
            "queue",
        ),
    ];
    // Every case is tried before asserting, so a failure lists them all.
    let mut wrong = Vec::new();
    for (what, body, field) in &cases {
        let response = post("/v1/runs", body.clone()).await.expect("send");
        if let Some(answer) = refusal_mismatch(response, &[field]).await {
            wrong.push(format!("POST /v1/runs, NUL in {what}: {answer}"));
        }
    }
    let good = json!({ "steps": [echo] });
    for (what, body, field) in &cases {
        let mut runs = vec![good.clone(); 5];
        runs[3] = body.clone();
        let response = post("/v1/runs/batch", json!({ "runs": runs }))
            .await
            .expect("send");
        if let Some(answer) = refusal_mismatch(response, &["runs[3]", field]).await {
            wrong.push(format!(
                "POST /v1/runs/batch, NUL in runs[3]'s {what}: {answer}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "not refused with a 422 naming the field:\n{}",
        wrong.join("\n")
    );

    let runs: i64 = db.scalar("SELECT count(*) FROM runs").await;
    let outbox: i64 = db.scalar("SELECT count(*) FROM outbox").await;
    assert_eq!((runs, outbox), (0, 0), "nothing was inserted");
}

/// Invariant 8 (caps count execution): one slot and a prefetch of 10 claim
/// five runs at once; each sleeps 1.2 s under a 2 s `timeout_seconds`. Time
/// spent waiting in the prefetch buffer does not count, so all five succeed.
#[tokio::test]
async fn prefetched_runs_are_not_charged_for_time_in_the_buffer() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let nap = || {
        let mut run = CreateRun::new(vec![NewStep::new("nap", "sleep", json!({ "ms": 1_200 }))]);
        run.timeout_seconds = Some(2);
        run
    };
    let runs = db.enqueue(tenant, (0..5).map(|_| nap()).collect()).await;
    let config = WorkerConfig {
        prefetch: 10,
        ..worker_config(1)
    };
    let worker = RunningWorker::start(Worker::new(db.new_pool(4), config));
    db.wait_all_terminal(Duration::from_secs(30)).await;
    let report = worker.stop().await;

    let ids: Vec<Uuid> = runs.iter().map(|r| r.id).collect();
    let stopped = offenders(&db, &ids, "r.status <> 'succeeded' OR r.attempt <> 1").await;
    assert!(
        stopped.is_empty(),
        "runs charged for waiting in the prefetch buffer (status, attempt, error): {stopped:?}"
    );
    let claims: i64 = db
        .scalar("SELECT count(DISTINCT runq_outbox_event(o)->>'occurred_at') FROM outbox o WHERE event_type = 'run.started'")
        .await;
    assert_eq!(
        (report.claimed, claims),
        (5, 1),
        "the five runs were claimed together, ahead of the one slot"
    );
    check_invariants(&db).await;
}

/// Invariant 1 (one executor; local lease deadline): a worker process whose
/// connections to Postgres are cut mid-step (through a proxy that then
/// blackholes reconnects) aborts the step in flight before its lease could
/// have expired, counted from its last successful heartbeat, and sends no
/// further request for that attempt. Another worker then takes the run over
/// and completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_cut_off_from_postgres_stops_before_its_lease_expires() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let target = Target::start();
    let proxy = Proxy::start(&db.url).await;
    let mut cut_off = Proc::worker(
        &proxy.url,
        &[
            ("RUNQ_LEASE_MS", "3000"),
            ("RUNQ_HEARTBEAT_MS", "500"),
            ("RUNQ_CONCURRENCY", "1"),
        ],
    );
    // Quick steps, then one that outlasts the lease on attempt 1, then more.
    const LONG: i32 = 3;
    let steps = (0..6)
        .map(|position| {
            let url = if position == LONG {
                target.url_with_delay(30_000, Some(1))
            } else {
                target.url_with_delay(50, None)
            };
            NewStep::new(format!("call{position}"), "http", json!({ "url": url }))
        })
        .collect();
    let run = db
        .enqueue(tenant, vec![CreateRun::new(steps)])
        .await
        .remove(0);
    db.wait_for(
        "the long step to be in flight",
        Duration::from_secs(20),
        || async { target.seen.saw_step(run.id, 1, LONG) },
    )
    .await;

    proxy.cut();
    let cut_at = Instant::now();
    // The lease as Postgres last extended it: heartbeats committed before the
    // cut may still land just after it, so track it until it runs out.
    let lease_deadline = std::cell::Cell::new(cut_at);
    db.wait_for(
        "the cut-off worker's lease to expire",
        Duration::from_secs(20),
        || async {
            let left_ms: Option<f64> = sqlx::query_scalar(
                "SELECT (extract(epoch FROM lease_expires_at - now()) * 1000)::float8
             FROM runs WHERE id = $1 AND status = 'running'",
            )
            .bind(run.id)
            .fetch_optional(&db.pool)
            .await
            .expect("lease")
            .flatten();
            match left_ms {
                Some(ms) if ms > 0.0 => {
                    lease_deadline.set(
                        lease_deadline
                            .get()
                            .max(Instant::now() + Duration::from_secs_f64(ms / 1_000.0)),
                    );
                    false
                }
                _ => true,
            }
        },
    )
    .await;
    let lease_deadline = lease_deadline.get();

    let mut survivor = Proc::worker(&db.url, &[("RUNQ_LEASE_MS", "3000")]);
    db.wait_all_terminal(Duration::from_secs(20)).await;
    survivor.stop().await;

    let lease_left = lease_deadline.saturating_duration_since(cut_at);
    let late: Vec<_> = target
        .seen
        .requests()
        .into_iter()
        .filter(|r| r.id == run.id && r.attempt == 1 && r.arrived > cut_at)
        .map(|r| (r.position, r.arrived - cut_at))
        .collect();
    assert!(
        late.is_empty(),
        "the cut-off worker kept calling the target: {late:?} after the cut"
    );
    match target.seen.end_of(run.id, 1, LONG) {
        None => panic!(
            "the cut-off worker's step was still in flight {:?} after the cut; \
             its lease ran out {lease_left:?} after the cut",
            cut_at.elapsed()
        ),
        Some(end) => {
            assert!(!end.answered, "the step ran to its answer: {end:?}");
            assert!(
                end.at < lease_deadline,
                "the step was aborted {:?} after the cut, after its lease ran out ({lease_left:?})",
                end.at - cut_at
            );
        }
    }
    let (status, attempt) = status_and_attempt(&db, run.id).await;
    assert_eq!((status.as_str(), attempt), ("succeeded", 2));
    assert!(
        cut_off.alive(),
        "the cut-off worker is still up, just cut off"
    );
    check_invariants(&db).await;
}

/// The rescuer honours cancel requests: a run whose worker stalled (SIGSTOP)
/// after a client asked to cancel it ends `cancelled` when its lease
/// expires, instead of going back to pending and being executed again.
#[tokio::test]
async fn rescued_run_with_a_cancel_request_ends_cancelled() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let lease = [("RUNQ_LEASE_MS", "1000"), ("RUNQ_HEARTBEAT_MS", "200")];
    let mut stalled = Proc::worker(&db.url, &lease);
    let stalled_id = worker_id_of(&db, stalled.child.id()).await;
    let run = db
        .enqueue(
            tenant,
            vec![CreateRun::new(vec![NewStep::new(
                "nap",
                "sleep",
                json!({ "ms": 60_000 }),
            )])],
        )
        .await
        .remove(0);
    db.wait_for("the run to be claimed", Duration::from_secs(10), || async {
        held_by(&db, stalled_id).await == 1
    })
    .await;

    stalled.signal(Signal::SIGSTOP);
    let mut tx = db.pool.begin().await.expect("begin");
    let asked = runs::cancel(&mut tx, tenant, run.id).await.expect("cancel");
    tx.commit().await.expect("commit");
    assert!(asked.cancel_requested, "the running run is flagged");
    db.wait_for(
        "the stalled worker's lease to expire",
        Duration::from_secs(10),
        || async {
            let expired: bool = sqlx::query_scalar(
                "SELECT status <> 'running' OR lease_expires_at < now() FROM runs WHERE id = $1",
            )
            .bind(run.id)
            .fetch_one(&db.pool)
            .await
            .expect("lease");
            expired
        },
    )
    .await;
    let mut rescuer = Proc::worker(&db.url, &lease);
    db.wait_all_terminal(Duration::from_secs(20)).await;
    rescuer.stop().await;
    stalled.signal(Signal::SIGKILL);
    stalled.wait_exit(Duration::from_secs(5)).await;

    let (status, attempt, error): (String, i32, Option<Value>) =
        sqlx::query_as("SELECT status::text, attempt, error FROM runs WHERE id = $1")
            .bind(run.id)
            .fetch_one(&db.pool)
            .await
            .expect("run");
    let events = outbox_types(&db, run.id).await;
    assert_eq!(
        events,
        vec!["run.created", "run.started", "run.cancelled"],
        "cancelled by the rescuer, never started again"
    );
    assert_eq!((status.as_str(), attempt), ("cancelled", 1));
    assert_eq!(error.expect("error")["reason"], "cancelled");
    check_invariants(&db).await;
}

/// The detector `worker_cut_off_from_postgres_stops_before_its_lease_expires`
/// relies on: the target notices within moments when a caller abandons a
/// request mid-wait (as an aborted `http` step does), and tells it apart
/// from a request it answered.
#[tokio::test]
async fn target_notices_an_abandoned_request() {
    let target = Target::start();
    let step = |attempt: i32| runq_shared::StepInput {
        id: Uuid::now_v7(),
        attempt,
        position: 0,
        name: "call".to_owned(),
        input: json!({}),
        prev: Value::Null,
        results: Vec::new(),
        metadata: json!({}),
        project: None,
    };
    let client = reqwest::Client::new();
    let (abandoned, answered) = (step(1), step(2));
    let url = target.url_with_delay(10_000, Some(1));
    let gave_up = client
        .post(&url)
        .json(&abandoned)
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .expect("the status comes at once")
        .text()
        .await;
    assert!(gave_up.is_err(), "the caller gave up before the answer");
    let hung_up = Instant::now();
    // Delayed too, so its answer comes after trickled whitespace.
    let reply = client
        .post(target.url_with_delay(200, None))
        .json(&answered)
        .send()
        .await
        .expect("send");
    assert!(reply.status().is_success());
    let body: Value = reply.json().await.expect("a JSON answer");
    assert_eq!(body, json!({ "attempt": 2, "position": 0 }));

    let end = wait_for_value(
        "the abandoned request to end",
        Duration::from_secs(2),
        || async { target.seen.end_of(abandoned.id, 1, 0) },
    )
    .await;
    assert!(!end.answered, "{end:?}");
    assert!(
        end.at.saturating_duration_since(hung_up) < Duration::from_millis(500),
        "noticed {:?} after the hang-up",
        end.at.saturating_duration_since(hung_up)
    );
    let end = target.seen.end_of(answered.id, 2, 0).expect("ended");
    assert!(end.answered, "{end:?}");
}
