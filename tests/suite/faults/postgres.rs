//! Postgres faults: terminated connections, a restart under load, a burst that could deadlock.

use super::*;

/// The status of every answer the sender got, with the run's id on a 201.
type Outcomes = Arc<Mutex<Vec<(u16, Option<uuid::Uuid>)>>>;

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
        let cut_at: f64 =
            sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
                .fetch_one(&admin)
                .await
                .expect("clock");
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
        // reconnected on its own. Nothing else here connects meanwhile.
        db.wait_for(
            "the worker to reconnect",
            Duration::from_secs(20),
            || async { runq_connections_since(&admin, cut_at).await > 0 },
        )
        .await;
    }
    db.wait_all_terminal(Duration::from_secs(60)).await;

    assert!(worker.alive(), "the worker recovered without a restart");
    assert_eq!(db.count_status("succeeded").await, 30);
    worker.stop().await;
    check_invariants(&db).await;
}

/// How many `runq` connections to this test's database, other than the
/// asking one, were opened after `since` (seconds since the epoch).
async fn runq_connections_since(admin: &sqlx::PgPool, since: f64) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND application_name = 'runq'
           AND extract(epoch FROM backend_start) > $1",
    )
    .bind(since)
    .fetch_one(admin)
    .await
    .expect("count connections")
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
    // The outage must find the worker busy, not still starting up (a worker
    // that cannot migrate or register at start-up exits).
    worker_id_of(&db, worker.child.id()).await;

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
    db.wait_for(
        "the worker to complete a run before the outage",
        Duration::from_secs(30),
        || async { db.count_status("succeeded").await > 0 },
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
