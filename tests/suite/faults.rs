//! Fault tests: real `runq` processes killed, paused, cut off from Postgres,
//! and Postgres itself restarted. After each, DESIGN.md's invariants are
//! checked over every run (`check_invariants`). `just test-fast` skips these.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use runq_devtools::postgres::{Durability, LocalCluster};
use runq_shared::db::runs;
use runq_shared::{CreateRun, NewStep};
use serde_json::{json, Value};

use crate::support::process::{free_port, Proc};
use crate::support::target::Target;
use crate::support::{check_invariants, held_by, poll, token, wait_for, worker_id_of, TestDb};

/// The status of every answer the sender got, with the run's id on a 201.
type Outcomes = Arc<Mutex<Vec<(u16, Option<uuid::Uuid>)>>>;

/// Short leases so a dead worker's runs come back within a second or two.
const FAST_LEASE: [(&str, &str); 2] = [("RUNQ_LEASE_MS", "1000"), ("RUNQ_HEARTBEAT_MS", "200")];

fn http_run(url: &str) -> CreateRun {
    CreateRun::new(vec![
        NewStep::new("call", "http", json!({ "url": url })),
        NewStep::new("after", "echo", json!({ "after": true })),
    ])
}

async fn row(db: &TestDb, id: uuid::Uuid) -> (String, i32, Option<Value>, Option<Value>) {
    sqlx::query_as("SELECT status::text, attempt, result, error FROM runs WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("run")
}

async fn wait_seen(target: &Target, id: uuid::Uuid, attempt: i32) {
    wait_for(
        &format!("the target to see attempt {attempt} of {id}"),
        Duration::from_secs(20),
        &mut || async { target.seen.saw(id, attempt) },
    )
    .await;
}

/// Fault 1 (invariant 2): SIGKILL a worker mid-run; after its lease expires
/// the run is rescued and completes exactly once on another worker.
#[tokio::test]
async fn sigkilled_worker_run_is_rescued_and_completes_once_elsewhere() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let target = Target::start();
    let mut doomed = Proc::worker(&db.url, &FAST_LEASE);
    let run = db
        .enqueue(
            tenant,
            vec![http_run(&target.url_with_delay(60_000, Some(1)))],
        )
        .await
        .remove(0);
    wait_seen(&target, run.id, 1).await;

    doomed.signal(Signal::SIGKILL);
    doomed.wait_exit(Duration::from_secs(5)).await;
    let mut survivor = Proc::worker(&db.url, &FAST_LEASE);
    db.wait_all_terminal(Duration::from_secs(30)).await;
    survivor.stop().await;

    let (status, attempt, result, _) = row(&db, run.id).await;
    assert_eq!((status.as_str(), attempt), ("succeeded", 2));
    assert_eq!(
        result.expect("result")["body"]["attempt"],
        2,
        "the second attempt's result"
    );
    assert_eq!(target.seen.all(), vec![(run.id, 1), (run.id, 2)]);
    check_invariants(&db).await;
}

/// Fault 2 (invariants 1 and 2): SIGKILL a worker four times during a
/// 300-run load, each time while it holds runs. The runs it held are rescued
/// (`lease_expired`, another attempt), every run succeeds, and no attempt is
/// executed twice: the target sees each (run, attempt) at most once, never an
/// attempt the run did not count, and the attempt whose reply is the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_workers_repeatedly_during_load_loses_and_doubles_nothing() {
    const RUNS: i64 = 300;
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let target = Target::start();
    let env = [
        FAST_LEASE[0],
        FAST_LEASE[1],
        ("RUNQ_CONCURRENCY", "5"),
        ("RUNQ_PREFETCH", "5"),
    ];
    let mut workers: Vec<Proc> = (0..3).map(|_| Proc::worker(&db.url, &env)).collect();
    let url = target.url_with_delay(100, None);
    // Attempts to spare: a run may be held by more than one of the victims.
    let run = || CreateRun {
        max_attempts: 10,
        ..http_run(&url)
    };
    db.enqueue(tenant, (0..RUNS).map(|_| run()).collect()).await;

    // (run, attempt) each victim held when it died, per round.
    let mut orphaned: Vec<Vec<(uuid::Uuid, i32)>> = Vec::new();
    for round in 0..4i64 {
        // Spread the kills through the load.
        db.wait_for("the load to progress", Duration::from_secs(60), || async {
            db.count_status("succeeded").await >= round * 40
        })
        .await;
        let victim = round as usize % workers.len();
        let id = worker_id_of(&db, workers[victim].child.id()).await;
        db.wait_for(
            "the victim to hold runs",
            Duration::from_secs(30),
            || async { held_by(&db, id).await >= 3 },
        )
        .await;
        workers[victim].signal(Signal::SIGKILL);
        workers[victim].wait_exit(Duration::from_secs(5)).await;
        let held: Vec<(uuid::Uuid, i32)> = sqlx::query_as(
            "SELECT id, attempt FROM runs WHERE locked_by = $1 AND status = 'running'",
        )
        .bind(id)
        .fetch_all(&db.pool)
        .await
        .expect("held runs");
        orphaned.push(held);
        workers[victim] = Proc::worker(&db.url, &env);
    }
    db.wait_all_terminal(Duration::from_secs(90)).await;
    for worker in &mut workers {
        worker.stop().await;
    }

    assert_eq!(db.count_status("succeeded").await, RUNS);
    for (round, held) in orphaned.iter().enumerate() {
        let (ids, attempts): (Vec<uuid::Uuid>, Vec<i32>) = held.iter().copied().unzip();
        // A held attempt is either rescued, or was finished by a write the
        // victim had sent just before it died (Postgres still commits it).
        let fates: Vec<(uuid::Uuid, i32, bool, bool)> = sqlx::query_as(
            "SELECT h.id, h.attempt,
                EXISTS (SELECT 1 FROM outbox o WHERE o.run_id = h.id
                        AND o.event_type = 'run.retrying'
                        AND (o.payload->'run'->>'attempt')::int4 = h.attempt
                        AND o.payload->'run'->'error'->>'reason' = 'lease_expired'),
                EXISTS (SELECT 1 FROM outbox o WHERE o.run_id = h.id
                        AND o.event_type = 'run.succeeded'
                        AND (o.payload->'run'->>'attempt')::int4 = h.attempt)
             FROM unnest($1::uuid[], $2::int4[]) AS h(id, attempt)",
        )
        .bind(&ids)
        .bind(&attempts)
        .fetch_all(&db.pool)
        .await
        .expect("fates");
        let lost: Vec<_> = fates.iter().filter(|f| !f.2 && !f.3).collect();
        assert!(
            lost.is_empty(),
            "round {round}: held by the killed worker, neither rescued nor finished: {lost:?}"
        );
        assert!(
            fates.iter().any(|f| f.2),
            "round {round}: the kill left runs to rescue: {fates:?}"
        );
    }

    let seen = target.seen.all();
    let mut once = std::collections::HashSet::new();
    let twice: Vec<_> = seen.iter().filter(|pair| !once.insert(**pair)).collect();
    assert!(
        twice.is_empty(),
        "attempts that called the target twice: {twice:?}"
    );
    // The attempt that finished the http step (attempts that died after its
    // checkpoint resume at the echo step and never call the target again).
    let finished: Vec<(uuid::Uuid, i32, i32, Option<i64>)> = sqlx::query_as(
        "SELECT r.id, r.attempt, s.attempt, (r.result->'body'->>'attempt')::int8
         FROM runs r JOIN run_steps s ON s.run_id = r.id AND s.position = 0",
    )
    .fetch_all(&db.pool)
    .await
    .expect("runs");
    for (id, attempt, http_attempt, result_attempt) in finished {
        assert!(
            once.contains(&(id, http_attempt)),
            "{id}: the target never saw attempt {http_attempt}, which finished the http step"
        );
        assert_eq!(
            result_attempt,
            Some(i64::from(http_attempt)),
            "{id}: the result is the reply to the attempt that finished the http step"
        );
        let highest = seen
            .iter()
            .filter(|(run, _)| *run == id)
            .map(|(_, a)| *a)
            .max();
        assert!(
            highest <= Some(attempt),
            "{id}: the target saw attempt {highest:?} of a run at attempt {attempt}"
        );
    }
    check_invariants(&db).await;
}

/// Fault 3: `pg_terminate_backend` on all of a worker's connections mid-run:
/// the same process recovers on its own and its runs complete.
#[tokio::test]
async fn worker_recovers_when_its_connections_are_terminated() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let target = Target::start();
    let env = [FAST_LEASE[0], FAST_LEASE[1], ("RUNQ_CONCURRENCY", "5")];
    let mut worker = Proc::worker(&db.url, &env);
    let url = target.url_with_delay(300, None);
    db.enqueue(tenant, (0..30).map(|_| http_run(&url)).collect())
        .await;
    db.wait_for("runs to be executing", Duration::from_secs(20), || async {
        db.count_status("running").await > 0
    })
    .await;

    let admin = db.new_pool(1);
    for _ in 0..3 {
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND application_name = 'runq'",
        )
        .fetch_all(&admin)
        .await
        .expect("terminate");
        assert!(!killed.is_empty(), "the worker had connections to cut");
        // The next cut needs connections to cut: wait until the worker has
        // reconnected on its own.
        db.wait_for(
            "the worker to reconnect",
            Duration::from_secs(20),
            || async { runq_connections(&admin).await > 0 },
        )
        .await;
    }
    db.wait_all_terminal(Duration::from_secs(60)).await;

    assert!(worker.alive(), "the worker recovered without a restart");
    assert_eq!(db.count_status("succeeded").await, 30);
    worker.stop().await;
    check_invariants(&db).await;
}

/// How many connections `runq` processes hold on this test's database.
async fn runq_connections(admin: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'runq'",
    )
    .fetch_one(admin)
    .await
    .expect("count connections")
}

/// A cluster of this test's own (so it can be stopped), deleted afterwards.
struct OwnCluster {
    cluster: LocalCluster,
    dir: std::path::PathBuf,
}

impl OwnCluster {
    fn start() -> Self {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("runq-fault-pg-{}", uuid::Uuid::now_v7().simple()));
        let cluster = LocalCluster::start(&dir, Durability::Fast).unwrap_or_else(|err| {
            panic!("this test restarts Postgres and needs local binaries: {err}")
        });
        OwnCluster { cluster, dir }
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = self.cluster.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Fault 4: Postgres restarts while the API accepts runs and a worker is busy.
/// Clients see 503s (never 500s, never hangs) during the outage, and every
/// run acknowledged with 201 exists and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load_loses_no_acknowledged_run() {
    let own = OwnCluster::start();
    runq_devtools::postgres::create_database(&own.cluster.url("postgres"), "runq")
        .await
        .expect("database");
    let url = own.cluster.url("runq");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut api = Proc::spawn(
        &["api"],
        &url,
        &[
            ("RUNQ_LISTEN", &listen),
            ("RUNQ_DB_ACQUIRE_TIMEOUT_MS", "1000"),
        ],
    );
    let base = format!("http://{listen}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let ready = poll(Duration::from_secs(30), || async {
        client
            .get(format!("{base}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
            .then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "the API never became ready: {}",
        api.log_text()
    );
    let db = TestDb::attach(&url).await;
    let tenant = db.tenant("acme").await;
    let token = token(&db, tenant).await;
    let mut worker = Proc::worker(&url, &[("RUNQ_CONCURRENCY", "5")]);

    // Every answer so far, in order; the sender runs until `done`.
    let outcomes: Outcomes = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let client = client.clone();
        let base = base.clone();
        let outcomes = outcomes.clone();
        let done = done.clone();
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let body = json!({ "steps": [{ "name": "e", "kind": "echo", "input": {} }] });
                let response = client
                    .post(format!("{base}/v1/runs"))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await;
                match response {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        if status == 503 {
                            assert!(
                                response.headers().contains_key("retry-after"),
                                "503 carries Retry-After"
                            );
                        }
                        let id = if status == 201 {
                            let run: runq_shared::Run = response.json().await.expect("run");
                            Some(run.id)
                        } else {
                            None
                        };
                        outcomes.lock().expect("outcomes").push((status, id));
                    }
                    Err(err) => panic!("request failed instead of answering: {err}"),
                }
            }
        })
    };
    // Each phase waits for the sender to have seen it: runs acknowledged
    // before the outage, an answer during it, a run acknowledged after it.
    // A sender that died (a failed request) ends the wait at once.
    let answered_after = |from: usize, pred: fn(u16) -> bool| {
        let outcomes = outcomes.clone();
        let sender = &sender;
        move || {
            let seen = outcomes.lock().expect("outcomes")[from..]
                .iter()
                .any(|(status, _)| pred(*status));
            let finished = sender.is_finished();
            async move { seen || finished }
        }
    };
    let seen = || outcomes.lock().expect("outcomes").len();
    wait_for(
        "runs acknowledged before the outage",
        Duration::from_secs(30),
        &mut answered_after(0, |status| status == 201),
    )
    .await;
    db.pool.close().await;
    own.cluster.stop().expect("stop postgres");
    wait_for(
        "an answer during the outage",
        Duration::from_secs(30),
        &mut answered_after(seen(), |status| status != 201),
    )
    .await;
    own.cluster
        .restart(Durability::Fast)
        .expect("start postgres");
    wait_for(
        "a run acknowledged after the restart",
        Duration::from_secs(30),
        &mut answered_after(seen(), |status| status == 201),
    )
    .await;
    done.store(true, Ordering::SeqCst);
    sender.await.expect("sender");
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    let db = TestDb::attach(&url).await;
    let acknowledged: Vec<uuid::Uuid> = outcomes.iter().filter_map(|(_, id)| *id).collect();
    let statuses: std::collections::BTreeSet<u16> = outcomes.iter().map(|(s, _)| *s).collect();
    assert!(
        statuses.contains(&503),
        "the outage was seen as 503: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 503),
        "only 201 and 503: {statuses:?}"
    );
    db.wait_all_terminal(Duration::from_secs(60)).await;
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM runs WHERE id = ANY($1) AND status = 'succeeded'")
            .bind(&acknowledged)
            .fetch_one(&db.pool)
            .await
            .expect("count");
    assert_eq!(
        succeeded as usize,
        acknowledged.len(),
        "every acknowledged run completed"
    );
    assert!(
        worker.alive() && api.alive(),
        "both processes rode out the restart"
    );
    worker.stop().await;
    api.stop().await;
    check_invariants(&db).await;
}

/// The run's row, steps, events and outbox rows, as text, to compare
/// before and after something that must not write.
async fn written(db: &TestDb, id: uuid::Uuid) -> String {
    sqlx::query_scalar(
        "SELECT concat_ws(E'\\n',
             (SELECT row_to_json(r)::text FROM runs r WHERE r.id = $1),
             (SELECT json_agg(s ORDER BY s.position)::text FROM run_steps s WHERE s.run_id = $1),
             (SELECT json_agg(e ORDER BY e.id)::text FROM run_events e WHERE e.run_id = $1),
             (SELECT json_agg(o ORDER BY o.id)::text FROM outbox o WHERE o.run_id = $1))",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .expect("snapshot")
}

/// Fault 5 (invariant 1): a worker paused (SIGSTOP) past its lease while its
/// `http` step waits for the reply; another worker takes the run over and
/// completes it. Woken once the target has answered, then stopped (its
/// completer flushes on a graceful stop), the paused worker writes nothing:
/// the result, the step output and the events are attempt 2's, and the run
/// has exactly one terminal outbox row.
#[tokio::test]
async fn paused_worker_late_completion_is_refused() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let target = Target::start();
    let mut paused = Proc::worker(&db.url, &FAST_LEASE);
    let call = NewStep::new(
        "call",
        "http",
        json!({ "url": target.url_with_delay(1_500, Some(1)) }),
    );
    let run = db
        .enqueue(tenant, vec![CreateRun::new(vec![call])])
        .await
        .remove(0);
    wait_seen(&target, run.id, 1).await;

    paused.signal(Signal::SIGSTOP);
    let mut owner = Proc::worker(&db.url, &FAST_LEASE);
    db.wait_all_terminal(Duration::from_secs(30)).await;
    owner.stop().await;
    wait_for(
        "the target to answer attempt 1",
        Duration::from_secs(10),
        &mut || async { target.seen.answered(run.id, 1) },
    )
    .await;
    let before = written(&db, run.id).await;
    paused.signal(Signal::SIGCONT);
    let status = paused.stop().await;

    assert!(status.success(), "exit status {status}");
    assert_eq!(
        written(&db, run.id).await,
        before,
        "the paused worker's late completion wrote nothing"
    );
    let (status, attempt, result, _) = row(&db, run.id).await;
    assert_eq!((status.as_str(), attempt), ("succeeded", 2));
    assert_eq!(
        result.expect("result")["body"]["attempt"],
        2,
        "the new owner's result stands"
    );
    let (step_attempt, output): (i32, Value) =
        sqlx::query_as("SELECT attempt, output FROM run_steps WHERE run_id = $1")
            .bind(run.id)
            .fetch_one(&db.pool)
            .await
            .expect("step");
    assert_eq!((step_attempt, &output["body"]["attempt"]), (2, &json!(2)));
    let events: Vec<(i32, String)> =
        sqlx::query_as("SELECT attempt, kind FROM run_events WHERE run_id = $1 ORDER BY id")
            .bind(run.id)
            .fetch_all(&db.pool)
            .await
            .expect("events");
    assert_eq!(events, vec![(2, "http.response".to_owned())]);
    let outbox: Vec<String> =
        sqlx::query_scalar("SELECT event_type FROM outbox WHERE run_id = $1 ORDER BY id")
            .bind(run.id)
            .fetch_all(&db.pool)
            .await
            .expect("outbox");
    assert_eq!(
        outbox,
        vec![
            "run.created",
            "run.started",
            "run.retrying",
            "run.started",
            "run.succeeded"
        ]
    );
    check_invariants(&db).await;
}

/// Fault 6: a run longer than its duration cap ends `stopped_quota` with
/// reason `duration_cap`, within a bounded delay of the cap; both the
/// server's cap and a run's own shorter timeout apply.
#[tokio::test]
async fn run_past_its_duration_cap_is_stopped() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    // 0.02 minutes: a 1.2 s server cap.
    let mut worker = Proc::worker(&db.url, &[("MAX_RUN_DURATION_MINUTES", "0.02")]);
    let endless = || {
        CreateRun::new(vec![
            NewStep::new("nap", "sleep", json!({ "ms": 60_000 })),
            NewStep::new("never", "echo", json!({})),
        ])
    };
    let mut own_timeout = endless();
    own_timeout.timeout_seconds = Some(1);
    let runs = db.enqueue(tenant, vec![endless(), own_timeout]).await;
    db.wait_all_terminal(Duration::from_secs(30)).await;
    worker.stop().await;

    for (run, cap_ms) in runs.iter().zip([1_200i64, 1_000]) {
        let (status, _, _, error) = row(&db, run.id).await;
        assert_eq!(status, "stopped_quota");
        assert_eq!(error.expect("error")["reason"], "duration_cap");
        let took_ms: f64 = sqlx::query_scalar(
            "SELECT (extract(epoch FROM finished_at - started_at) * 1000)::float8 FROM runs WHERE id = $1",
        )
        .bind(run.id)
        .fetch_one(&db.pool)
        .await
        .expect("duration");
        assert!(
            took_ms >= cap_ms as f64 - 50.0 && took_ms < cap_ms as f64 + 2_000.0,
            "stopped after {took_ms} ms, cap {cap_ms} ms"
        );
        let never: String = sqlx::query_scalar(
            "SELECT status::text FROM run_steps WHERE run_id = $1 AND position = 1",
        )
        .bind(run.id)
        .fetch_one(&db.pool)
        .await
        .expect("step");
        assert_eq!(never, "pending");
    }
    check_invariants(&db).await;
}

/// Fault 7: cancelling runs in the middle of a long `sleep` and a long `http`
/// step: they end `cancelled` within two seconds and step 3 never starts.
#[tokio::test]
async fn cancel_aborts_a_long_step_promptly() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let target = Target::start();
    let mut worker = Proc::worker(&db.url, &[]);
    let three = |middle: NewStep| {
        CreateRun::new(vec![
            NewStep::new("first", "echo", json!({})),
            middle,
            NewStep::new("third", "http", json!({ "url": target.url })),
        ])
    };
    let runs = db
        .enqueue(
            tenant,
            vec![
                three(NewStep::new("nap", "sleep", json!({ "ms": 60_000 }))),
                three(NewStep::new(
                    "call",
                    "http",
                    json!({ "url": target.url_with_delay(60_000, None) }),
                )),
            ],
        )
        .await;
    wait_seen(&target, runs[1].id, 1).await;
    db.wait_for(
        "both runs mid-way through step 2",
        Duration::from_secs(20),
        || async {
            let done: i64 = db
                .scalar(
                    "SELECT count(*) FROM run_steps WHERE position = 0 AND status = 'succeeded'",
                )
                .await;
            done == 2
        },
    )
    .await;

    let asked = Instant::now();
    for run in &runs {
        let mut tx = db.pool.begin().await.expect("begin");
        let cancelled = runs::cancel(&mut tx, tenant, run.id).await.expect("cancel");
        tx.commit().await.expect("commit");
        assert!(cancelled.cancel_requested);
    }
    db.wait_for("both runs cancelled", Duration::from_secs(10), || async {
        db.count_status("cancelled").await == 2
    })
    .await;
    let took = asked.elapsed();
    worker.stop().await;

    assert!(took < Duration::from_secs(2), "cancelled after {took:?}");
    let third_started: i64 = db
        .scalar("SELECT count(*) FROM run_steps WHERE position = 2 AND status <> 'pending'")
        .await;
    assert_eq!(third_started, 0, "step 3 never started");
    assert_eq!(
        target.seen.all().len(),
        1,
        "only the cancelled http call reached the target"
    );
    check_invariants(&db).await;
}

/// Fault 8: SIGTERM during load: in-flight runs finish within the grace
/// period or go back to pending; the hand-back charges no attempt.
#[tokio::test]
async fn sigterm_during_load_finishes_or_hands_back_without_charge() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let env = [("RUNQ_CONCURRENCY", "4"), ("RUNQ_SHUTDOWN_GRACE_MS", "300")];
    let mut worker = Proc::worker(&db.url, &env);
    let nap = |ms: u64| CreateRun::new(vec![NewStep::new("nap", "sleep", json!({ "ms": ms }))]);
    // Mixed lengths: some finish within the grace period, some cannot.
    db.enqueue(
        tenant,
        (0..40)
            .map(|i| nap(if i % 2 == 0 { 100 } else { 2_000 }))
            .collect(),
    )
    .await;
    db.wait_for("a few runs to finish", Duration::from_secs(20), || async {
        db.count_status("succeeded").await >= 4
    })
    .await;

    let status = worker.stop().await;

    assert!(status.success(), "exit status {status}");
    let running: i64 = db.count_status("running").await;
    assert_eq!(running, 0, "nothing left running");
    let charged: i64 = db
        .scalar("SELECT count(*) FROM runs WHERE status = 'pending' AND attempt <> 0")
        .await;
    assert_eq!(charged, 0, "handed-back runs kept their attempt");
    let released: i64 = db
        .scalar("SELECT count(*) FROM outbox WHERE event_type = 'run.released'")
        .await;
    assert!(released > 0, "some runs were handed back");
    check_invariants(&db).await;

    let mut next = Proc::worker(&db.url, &[("RUNQ_CONCURRENCY", "20")]);
    db.wait_all_terminal(Duration::from_secs(60)).await;
    next.stop().await;
    assert_eq!(db.count_status("succeeded").await, 40);
    let retried: i64 = db
        .scalar("SELECT count(*) FROM runs WHERE attempt <> 1")
        .await;
    assert_eq!(
        retried, 0,
        "every run succeeded on its first charged attempt"
    );
    check_invariants(&db).await;
}

/// libfaketime, which shifts a process's wall clock, or why it is missing.
fn faketime_library() -> Result<std::path::PathBuf, String> {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .iter()
        .map(std::path::PathBuf::from)
        .find(|path| path.is_file())
        .ok_or_else(|| {
            format!(
                "libfaketime is needed to skew a worker's clock and is not at any of {candidates:?}: \
                 apt-get install faketime (.ci/run does)"
            )
        })
}

/// Fault 9: a worker whose wall clock is minutes off still claims only due
/// runs, keeps its leases alive and enforces timeouts, because every lease
/// and schedule decision uses the database's `now()` and every timer the
/// monotonic clock.
#[tokio::test]
async fn worker_with_skewed_clock_claims_heartbeats_and_times_out_correctly() {
    let library = match faketime_library() {
        Ok(library) => library,
        Err(why) => return crate::support::skip_or_fail(&why),
    };
    for skew in ["+10m", "-10m"] {
        let db = TestDb::new().await;
        let tenant = db.tenant("acme").await;
        let mut worker = Proc::worker(
            &db.url,
            &[
                FAST_LEASE[0],
                FAST_LEASE[1],
                ("LD_PRELOAD", library.to_str().expect("utf-8 path")),
                ("FAKETIME", skew),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
                ("FAKETIME_DONT_RESET", "1"),
            ],
        );
        let mut later = CreateRun::new(vec![NewStep::new("e", "echo", json!({}))]);
        let db_now: chrono::DateTime<chrono::Utc> = db.scalar("SELECT now()").await;
        later.run_at = Some(db_now + chrono::Duration::seconds(2));
        // Longer than the 1 s lease: survives only if heartbeats extend it.
        let long = CreateRun::new(vec![NewStep::new("nap", "sleep", json!({ "ms": 2_500 }))]);
        let mut capped =
            CreateRun::new(vec![NewStep::new("nap", "sleep", json!({ "ms": 60_000 }))]);
        capped.timeout_seconds = Some(1);
        let runs = db.enqueue(tenant, vec![later, long, capped]).await;
        db.wait_all_terminal(Duration::from_secs(30)).await;
        worker.stop().await;

        // The worker's log timestamps come from its (skewed) wall clock.
        let log = worker.log_text();
        let logged = log
            .split_whitespace()
            .next()
            .and_then(|stamp| chrono::DateTime::parse_from_rfc3339(stamp).ok())
            .unwrap_or_else(|| panic!("no timestamped log line: {log}"));
        let off = (logged.with_timezone(&chrono::Utc) - db_now)
            .num_seconds()
            .abs();
        assert!(
            off > 9 * 60,
            "{skew}: the worker's clock was really skewed ({off} s)"
        );
        let (status, attempt, ..) = row(&db, runs[0].id).await;
        assert_eq!(
            (status.as_str(), attempt),
            ("succeeded", 1),
            "{skew}: delayed run"
        );
        let early: bool = sqlx::query_scalar("SELECT started_at < run_at FROM runs WHERE id = $1")
            .bind(runs[0].id)
            .fetch_one(&db.pool)
            .await
            .expect("times");
        assert!(
            !early,
            "{skew}: the delayed run was not claimed before its run_at"
        );
        let (status, attempt, ..) = row(&db, runs[1].id).await;
        assert_eq!(
            (status.as_str(), attempt),
            ("succeeded", 1),
            "{skew}: heartbeats kept the lease alive"
        );
        let (status, _, _, error) = row(&db, runs[2].id).await;
        assert_eq!(status, "stopped_quota", "{skew}");
        assert_eq!(error.expect("error")["reason"], "duration_cap");
        check_invariants(&db).await;
    }
}

/// Deadlocks Postgres detected in the test's database, once every other
/// client of it has gone (a backend reports its counts when it exits).
async fn deadlocks_detected(db: &TestDb) -> i64 {
    db.wait_for(
        "the workers' connections to close",
        Duration::from_secs(10),
        || async {
            let clients: i64 = db
                .scalar(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND backend_type = 'client backend'",
                )
                .await;
            clients <= i64::from(db.pool.size())
        },
    )
    .await;
    let mut conn = db.pool.acquire().await.expect("connection");
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await
        .expect("fresh statistics");
    sqlx::query_scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(&mut *conn)
        .await
        .expect("deadlocks")
}

/// Fault 10: a burst of 10,000 pending runs and 5 workers (one killed
/// mid-way, so the rescuer works alongside the claimers): Postgres detects no
/// deadlock in the test's database, and every run completes exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_ten_thousand_runs_on_five_workers_does_not_deadlock() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    for chunk in 0..10 {
        let batch = (0..1_000)
            .map(|i| {
                CreateRun::new(vec![NewStep::new(
                    "e",
                    "echo",
                    json!({ "i": chunk * 1_000 + i }),
                )])
            })
            .collect();
        db.enqueue(tenant, batch).await;
    }
    let before = deadlocks_detected(&db).await;
    let env = [FAST_LEASE[0], FAST_LEASE[1], ("RUNQ_CONCURRENCY", "10")];
    let mut workers: Vec<Proc> = (0..5).map(|_| Proc::worker(&db.url, &env)).collect();
    db.wait_for(
        "the burst to be under way",
        Duration::from_secs(30),
        || async { db.count_status("succeeded").await > 500 },
    )
    .await;
    workers[0].signal(Signal::SIGKILL);
    workers[0].wait_exit(Duration::from_secs(5)).await;
    db.wait_all_terminal(Duration::from_secs(180)).await;
    for worker in &mut workers[1..] {
        assert!(worker.stop().await.success());
    }

    assert_eq!(
        deadlocks_detected(&db).await - before,
        0,
        "Postgres detected deadlocks"
    );
    assert_eq!(db.count_status("succeeded").await, 10_000);
    check_invariants(&db).await;
}
