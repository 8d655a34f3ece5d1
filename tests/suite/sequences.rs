//! Sequence keys (README, "Sequence keys"): runs of a tenant with the same
//! key run one at a time in enqueue order; a failed run holds its key until
//! it succeeds after a retry or is cancelled; keys of other runs, and runs
//! without one, flow freely.

use std::time::Duration;

use runq_shared::db::runs::{self, Retention};
use runq_shared::db::sequences;
use runq_shared::{CreateRun, NewStep, RunStatus};
use serde_json::json;

use crate::support::process::Proc;
use crate::support::{self, worker_config, RunningWorker, TestDb};

fn keyed(key: Option<&str>, step: NewStep) -> CreateRun {
    let mut run = CreateRun::new(vec![step]);
    run.sequence_key = key.map(str::to_owned);
    run
}

fn sleep_step(ms: u64) -> NewStep {
    NewStep::new("s", "sleep", json!({ "ms": ms }))
}

/// When each run's only step started and finished (database clock).
async fn spans(db: &TestDb, ids: &[uuid::Uuid]) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for id in ids {
        let span: (f64, f64) = sqlx::query_as(
            "SELECT extract(epoch FROM started_at)::float8, extract(epoch FROM finished_at)::float8
             FROM run_steps WHERE run_id = $1 AND position = 0",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("step span");
        out.push(span);
    }
    out
}

/// Three runs with one key, enqueued one after another, and three worker
/// processes with room for all: the runs execute strictly one after
/// another in enqueue order, while runs without a key run beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_runs_one_at_a_time_in_enqueue_order_beside_free_runs() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let mut chained = Vec::new();
    for _ in 0..3 {
        chained.push(
            db.enqueue(tenant, vec![keyed(Some("account-7"), sleep_step(400))])
                .await
                .remove(0)
                .id,
        );
    }
    let free: Vec<uuid::Uuid> = db
        .enqueue(
            tenant,
            (0..6).map(|_| keyed(None, sleep_step(400))).collect(),
        )
        .await
        .iter()
        .map(|run| run.id)
        .collect();
    let env = [("RUNQ_CONCURRENCY", "4")];
    let mut workers: Vec<Proc> = (0..3).map(|_| Proc::worker(&db.url, &env)).collect();
    db.wait_all_terminal(Duration::from_secs(60)).await;
    for worker in &mut workers {
        worker.stop().await;
    }
    assert_eq!(db.count_status("succeeded").await, 9);
    let chain = spans(&db, &chained).await;
    for pair in chain.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "a run of the key started at {} before the one ahead finished at {}",
            pair[1].0,
            pair[0].1
        );
    }
    // The free runs did not wait for the chain: they ran during its first
    // link (six of them on twelve slots).
    let free = spans(&db, &free).await;
    let beside = free.iter().filter(|(start, _)| *start < chain[0].1).count();
    assert_eq!(beside, 6, "free runs started during the chain's first run");
    let waiting: i64 = db
        .scalar("SELECT count(*) FROM runs WHERE sequence_waiting")
        .await;
    assert_eq!(waiting, 0);
}

/// A run of a key that fails for good keeps the key: the run behind it
/// waits (and retention keeps the failed run) until the failed run is
/// cancelled; a retry that succeeds lets go of it too. Other keys of the
/// same tenant, and the same key of another tenant, are not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_holds_its_key_until_cancelled_or_retried_to_success() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let other = db.tenant("globex").await;
    let worker = RunningWorker::start(runq_worker::Worker::new(db.new_pool(4), worker_config(4)));
    let mut failing = keyed(Some("k"), NewStep::new("f", "fail", json!({})));
    failing.max_attempts = 1;
    let failed = db.enqueue(tenant, vec![failing]).await.remove(0).id;
    let behind = db
        .enqueue(tenant, vec![keyed(Some("k"), sleep_step(1))])
        .await
        .remove(0)
        .id;
    let elsewhere = db
        .enqueue(tenant, vec![keyed(Some("k2"), sleep_step(1))])
        .await
        .remove(0)
        .id;
    let other_tenant = db
        .enqueue(other, vec![keyed(Some("k"), sleep_step(1))])
        .await
        .remove(0)
        .id;
    let status = |id: uuid::Uuid| {
        let db = &db;
        async move { support::status_and_attempt(db, id).await.0 }
    };
    db.wait_for(
        "the other keys' runs to succeed",
        Duration::from_secs(20),
        || async {
            status(elsewhere).await == "succeeded" && status(other_tenant).await == "succeeded"
        },
    )
    .await;
    assert_eq!(status(failed).await, "failed");
    // The run behind the failed one stays waiting for as long as we watch
    // (the sequencer polls every 100 ms here; 20 of its passes).
    support::holds_throughout(Duration::from_secs(2), || async {
        assert_eq!(
            status(behind).await,
            "pending",
            "the run behind a failed one ran"
        );
    })
    .await;
    // Retention does not delete the failed holder while a run waits on it.
    let mut conn = db.pool.acquire().await.expect("connection");
    let zero = Retention {
        succeeded_seconds: 0.0,
        failed_seconds: 0.0,
    };
    sqlx::query("UPDATE runs SET finished_at = now() - interval '1 hour' WHERE id = $1")
        .bind(failed)
        .execute(&db.pool)
        .await
        .expect("age the failed run");
    runs::prune_finished(&mut conn, None, 500, zero, &[])
        .await
        .expect("prune");
    assert_eq!(status(failed).await, "failed", "retention kept the holder");

    // A retry that fails again keeps the key; cancelling lets go of it.
    runs::retry(&mut conn, tenant, failed).await.expect("retry");
    db.wait_for(
        "the retried run to fail again",
        Duration::from_secs(20),
        || async { status(failed).await == "failed" },
    )
    .await;
    assert_eq!(status(behind).await, "pending");
    let cancelled = runs::cancel(&mut conn, tenant, failed)
        .await
        .expect("cancel");
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    db.wait_for(
        "the run behind to succeed",
        Duration::from_secs(20),
        || async { status(behind).await == "succeeded" },
    )
    .await;

    // A retried run that succeeds lets go of the key as well (its step is
    // fixed between the failure and the retry).
    let mut flaky = keyed(Some("flaky"), NewStep::new("f", "fail", json!({})));
    flaky.max_attempts = 1;
    let flaky = db.enqueue(tenant, vec![flaky]).await.remove(0).id;
    let after_flaky = db
        .enqueue(tenant, vec![keyed(Some("flaky"), sleep_step(1))])
        .await
        .remove(0)
        .id;
    db.wait_for("the flaky run to fail", Duration::from_secs(20), || async {
        status(flaky).await == "failed"
    })
    .await;
    assert_eq!(status(after_flaky).await, "pending");
    sqlx::query("UPDATE run_steps SET kind = 'echo' WHERE run_id = $1")
        .bind(flaky)
        .execute(&db.pool)
        .await
        .expect("fix the step");
    runs::retry(&mut conn, tenant, flaky).await.expect("retry");
    db.wait_for("both to succeed", Duration::from_secs(20), || async {
        status(flaky).await == "succeeded" && status(after_flaky).await == "succeeded"
    })
    .await;
    drop(conn);
    worker.stop().await;
}

/// A cancelled run of a key that is retried queues up again behind the
/// key's current holder instead of running beside it.
#[tokio::test]
async fn a_retried_cancelled_run_queues_up_behind_the_holder() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let mut conn = db.pool.acquire().await.expect("connection");
    let first = db
        .enqueue(tenant, vec![keyed(Some("k"), sleep_step(1))])
        .await
        .remove(0)
        .id;
    let second = db
        .enqueue(tenant, vec![keyed(Some("k"), sleep_step(1))])
        .await
        .remove(0)
        .id;
    sequences::promote(&mut conn, 100).await.expect("promote");
    let waiting = |id: uuid::Uuid| {
        let db = &db;
        async move {
            sqlx::query_scalar::<_, bool>("SELECT sequence_waiting FROM runs WHERE id = $1")
                .bind(id)
                .fetch_one(&db.pool)
                .await
                .expect("waiting")
        }
    };
    assert!(!waiting(first).await, "the first run holds the key");
    assert!(waiting(second).await, "the second waits");
    runs::cancel(&mut conn, tenant, first)
        .await
        .expect("cancel");
    sequences::promote(&mut conn, 100).await.expect("promote");
    assert!(!waiting(second).await, "the second holds the key now");
    let again = runs::retry(&mut conn, tenant, first).await.expect("retry");
    assert_eq!(again.status, RunStatus::Pending);
    assert!(again.sequence_waiting, "the retried run waits again");
    sequences::promote(&mut conn, 100).await.expect("promote");
    assert!(waiting(first).await, "still behind the holder");
    let holders: i64 = db
        .scalar("SELECT count(*) FROM runs WHERE sequence_key = 'k' AND NOT sequence_waiting")
        .await;
    assert_eq!(holders, 1);
}

/// Invariant 7 for the promoter: the database refusing to let one key's run
/// go (a test trigger) costs the other keys woken in the same batch
/// nothing; the refused key is reported and its run keeps waiting.
#[tokio::test]
async fn a_refused_promotion_costs_the_other_keys_nothing() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    db.execute(
        r#"CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF NEW.sequence_key = 'poison' AND OLD.sequence_waiting
                  AND NOT NEW.sequence_waiting THEN
                   RAISE EXCEPTION 'poisoned key refused by a test trigger';
               END IF;
               RETURN NEW;
           END $$"#,
    )
    .await;
    db.execute(
        "CREATE TRIGGER refuse_poison BEFORE UPDATE ON runs
         FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    )
    .await;
    let keys = ["a", "b", "poison", "c", "'; DROP TABLE runs; --", "ключ/🔑"];
    let enqueued = db
        .enqueue(
            tenant,
            keys.iter()
                .map(|key| keyed(Some(key), sleep_step(1)))
                .collect(),
        )
        .await;
    let mut conn = db.pool.acquire().await.expect("connection");
    let report = sequences::promote(&mut conn, 100).await.expect("promote");
    assert_eq!(report.woken, keys.len() as u64);
    assert_eq!(report.promoted, keys.len() as u64 - 1);
    assert_eq!(report.refused.len(), 1);
    assert_eq!(report.refused[0].sequence_key, "poison");
    assert!(
        report.refused[0].reason.contains("poisoned key"),
        "{}",
        report.refused[0].reason
    );
    for (key, run) in keys.iter().zip(&enqueued) {
        let waiting: bool = sqlx::query_scalar("SELECT sequence_waiting FROM runs WHERE id = $1")
            .bind(run.id)
            .fetch_one(&db.pool)
            .await
            .expect("waiting");
        assert_eq!(waiting, *key == "poison", "key {key}");
    }
    let left: i64 = db.scalar("SELECT count(*) FROM sequence_wakeups").await;
    assert_eq!(left, 0, "the refused wakeup does not block the next pass");
}
