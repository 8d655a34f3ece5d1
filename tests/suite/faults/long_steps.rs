//! Long steps stopped by the duration cap or a cancel.

use super::*;

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
