//! Retention: finished runs are deleted (steps and events with them) past
//! their status's retention, capped by the tenant's `retention_days`.

use std::time::Duration;

use runq_shared::db::runs::Retention;
use runq_shared::quotas::Quota;
use runq_shared::{CreateRun, NewStep, TenantId};
use runq_worker::maintenance::Pruner;
use runq_worker::Worker;
use serde_json::json;
use uuid::Uuid;

use crate::support::{echo_run, worker_config, RunningWorker, TestDb};

const HOUR: f64 = 3600.0;

fn failing_run() -> CreateRun {
    let mut run = CreateRun::new(vec![NewStep::new("f", "fail", json!({}))]);
    run.max_attempts = 1;
    run
}

/// Moves run `id`'s finish `hours` into the past.
async fn finished_ago(db: &TestDb, id: Uuid, hours: f64) {
    sqlx::query("UPDATE runs SET finished_at = now() - make_interval(secs => $2) WHERE id = $1")
        .bind(id)
        .bind(hours * HOUR)
        .execute(&db.pool)
        .await
        .expect("backdate");
}

async fn exists(db: &TestDb, id: Uuid) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM runs WHERE id = $1)")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("exists")
}

async fn set_retention_days(db: &TestDb, tenant: TenantId, days: i64) {
    let mut conn = db.pool.acquire().await.expect("connection");
    let mut settings = runq_shared::db::quotas::get(&mut conn, tenant)
        .await
        .expect("get");
    settings.overrides.set(Quota::RetentionDays, Some(days));
    runq_shared::db::quotas::set(&mut conn, tenant, &settings)
        .await
        .expect("set");
}

/// Succeeded runs go an hour after they finished, failed ones after a day
/// (the defaults, BullMQ's in the seed system), with their steps and
/// events; younger finished runs and unfinished ones stay.
#[tokio::test]
async fn finished_runs_past_retention_are_deleted_with_their_steps_and_events() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let ok = db
        .enqueue(
            tenant,
            (0..2).map(|i| echo_run(json!({ "i": i }))).collect(),
        )
        .await;
    let bad = db
        .enqueue(tenant, (0..2).map(|_| failing_run()).collect())
        .await;
    let worker = RunningWorker::start(Worker::new(db.pool.clone(), worker_config(4)));
    db.wait_all_terminal(Duration::from_secs(20)).await;
    worker.stop().await;
    let mut later = echo_run(json!({}));
    later.run_at = Some(chrono::Utc::now() + chrono::Duration::days(30));
    let pending = db.enqueue(tenant, vec![later]).await.remove(0);
    db.execute(
        "INSERT INTO run_events (run_id, tenant_id, attempt, kind, data)
         SELECT id, tenant_id, 1, 'log', '{}' FROM runs",
    )
    .await;

    finished_ago(&db, ok[0].id, 2.0).await; // succeeded 2 h ago: goes
    finished_ago(&db, ok[1].id, 0.5).await; // succeeded 30 min ago: stays
    finished_ago(&db, bad[0].id, 2.0).await; // failed 2 h ago: stays
    finished_ago(&db, bad[1].id, 25.0).await; // failed 25 h ago: goes
    let pruner = Pruner::new(
        db.pool.clone(),
        Retention {
            succeeded_seconds: HOUR,
            failed_seconds: 24.0 * HOUR,
        },
    );
    assert_eq!(pruner.run_once().await.expect("prune"), 2);
    assert!(!exists(&db, ok[0].id).await);
    assert!(exists(&db, ok[1].id).await);
    assert!(exists(&db, bad[0].id).await);
    assert!(!exists(&db, bad[1].id).await);
    assert!(
        exists(&db, pending.id).await,
        "an unfinished run is never pruned"
    );
    let orphans: i64 = db
        .scalar(
            "SELECT (SELECT count(*) FROM run_steps s WHERE NOT EXISTS
                        (SELECT 1 FROM runs r WHERE r.id = s.run_id))
                  + (SELECT count(*) FROM run_events e WHERE NOT EXISTS
                        (SELECT 1 FROM runs r WHERE r.id = e.run_id))",
        )
        .await;
    assert_eq!(orphans, 0, "steps and events go with their run");
    let events: i64 = db.scalar("SELECT count(*) FROM run_events").await;
    assert_eq!(events, 3);
    assert_eq!(
        pruner.run_once().await.expect("prune"),
        0,
        "nothing left to do"
    );
}

/// Steps carry no foreign key to their run (migration 13: it locked the run
/// for every inserted step); a statement-level trigger deletes them with
/// their runs instead. It fires for a cascade too: deleting a tenant takes
/// its runs' steps, and only theirs.
#[tokio::test]
async fn a_deleted_tenants_runs_take_their_steps_with_them() {
    let db = TestDb::new().await;
    let gone = db.tenant("gone").await;
    let kept = db.tenant("kept").await;
    let two_steps = || {
        CreateRun::new(vec![
            NewStep::new("a", "echo", json!({})),
            NewStep::new("b", "echo", json!({})),
        ])
    };
    db.enqueue(gone, (0..3).map(|_| two_steps()).collect())
        .await;
    db.enqueue(kept, (0..2).map(|_| two_steps()).collect())
        .await;
    sqlx::query("DELETE FROM tenants WHERE id = $1")
        .bind(gone)
        .execute(&db.pool)
        .await
        .expect("delete the tenant");
    let (orphans, steps): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM run_steps s
                 WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = s.run_id)),
                (SELECT count(*) FROM run_steps)",
    )
    .fetch_one(&db.pool)
    .await
    .expect("count steps");
    assert_eq!(orphans, 0, "the deleted tenant's steps went with its runs");
    assert_eq!(steps, 4, "the other tenant's steps stay");
}

/// A tenant's `retention_days` caps how long its finished runs are kept,
/// whatever the server's retention; a tenant without the cap keeps the
/// server's.
#[tokio::test]
async fn retention_days_caps_a_tenants_retention() {
    let db = TestDb::new().await;
    let capped = db.tenant("capped").await;
    let open = db.tenant("open").await;
    set_retention_days(&db, capped, 1).await;
    let capped_run = db.enqueue(capped, vec![failing_run()]).await.remove(0);
    let open_run = db.enqueue(open, vec![failing_run()]).await.remove(0);
    let worker = RunningWorker::start(Worker::new(db.pool.clone(), worker_config(2)));
    db.wait_all_terminal(Duration::from_secs(20)).await;
    worker.stop().await;
    finished_ago(&db, capped_run.id, 30.0).await;
    finished_ago(&db, open_run.id, 30.0).await;
    // The server keeps failed runs 30 days.
    let pruner = Pruner::new(
        db.pool.clone(),
        Retention {
            succeeded_seconds: 30.0 * 24.0 * HOUR,
            failed_seconds: 30.0 * 24.0 * HOUR,
        },
    );
    assert_eq!(pruner.run_once().await.expect("prune"), 1);
    assert!(!exists(&db, capped_run.id).await, "capped at 1 day");
    assert!(exists(&db, open_run.id).await, "kept 30 days");
}

/// A transaction left open on the cluster (holding an xid: it stops vacuum
/// and holds back webhooks and streams) is reported with its pid, state
/// and age once past the threshold, and no longer once it ends.
#[tokio::test]
async fn a_transaction_left_open_is_reported() {
    use runq_worker::maintenance::LongTransactionWatch;
    let db = TestDb::new().await;
    let mut open = db.pool.begin().await.expect("begin");
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *open)
        .await
        .expect("pid");
    sqlx::query("SELECT txid_current()")
        .execute(&mut *open)
        .await
        .expect("xid");
    let watch = LongTransactionWatch::new(db.pool.clone(), 0.3);
    let found = crate::support::wait_for_value("reported", Duration::from_secs(10), || async {
        watch
            .run_once()
            .await
            .ok()?
            .into_iter()
            .find(|tx| tx.pid == pid)
    })
    .await;
    assert!(found.seconds >= 0.3, "{found:?}");
    assert_eq!(found.state.as_deref(), Some("idle in transaction"));
    open.rollback().await.expect("rollback");
    let after = watch.run_once().await.expect("look");
    assert!(
        after.iter().all(|tx| tx.pid != pid),
        "an ended transaction is reported"
    );
}

/// `GET /metrics` (unauthenticated, Prometheus text) reports the age of the
/// oldest open transaction: with one left open for a second, the gauge is at
/// least that old; the other gauges are there too.
#[tokio::test]
async fn metrics_report_the_oldest_open_transaction() {
    let db = TestDb::new().await;
    let api = crate::support::TestApi::start(db.new_pool(4), crate::support::TestApi::config());
    let mut open = db.pool.begin().await.expect("begin");
    sqlx::query("SELECT txid_current()")
        .execute(&mut *open)
        .await
        .expect("xid");
    let opened = std::time::Instant::now();
    let client = reqwest::Client::new();
    let url = format!("{}/metrics", api.base);
    let gauge = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|value| value.trim().parse().ok())
    };
    // The gauge is the cluster's oldest transaction, so it can never be
    // younger than ours: read our age before each scrape and compare.
    let (text, age, ours) = crate::support::wait_for_value(
        "the open transaction's age in /metrics",
        Duration::from_secs(10),
        || async {
            let ours = opened.elapsed().as_secs_f64();
            let response = client.get(&url).send().await.ok()?;
            assert_eq!(response.status(), reqwest::StatusCode::OK);
            let text = response.text().await.ok()?;
            let age = gauge(&text, "runq_oldest_transaction_age_seconds")?;
            (ours >= 1.0).then_some((text, age, ours))
        },
    )
    .await;
    assert!(
        age >= ours - 0.2,
        "the oldest transaction is {age} s old, but ours was open {ours} s"
    );
    assert!(
        text.contains("# TYPE runq_oldest_transaction_age_seconds gauge"),
        "{text}"
    );
    for name in [
        "runq_runs_dead_tuples",
        "runq_runs_live_tuples",
        "runq_live_workers",
    ] {
        assert!(gauge(&text, name).is_some(), "{name} missing from {text}");
    }
    open.rollback().await.expect("rollback");
    drop(api);
}
