//! Worker processes killed, paused and stopped mid-run.

use super::*;

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
                        AND (runq_outbox_event(o)->'run'->>'attempt')::int4 = h.attempt
                        AND runq_outbox_event(o)->'run'->'error'->>'reason' = 'lease_expired'),
                EXISTS (SELECT 1 FROM outbox o WHERE o.run_id = h.id
                        AND o.event_type = 'run.succeeded'
                        AND (runq_outbox_event(o)->'run'->>'attempt')::int4 = h.attempt)
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
    let outbox = outbox_types(&db, run.id).await;
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
