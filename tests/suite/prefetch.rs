//! The worker's prefetch buffer under a backlog: it grows with the start
//! rate, and a run enqueued into a quiet queue meanwhile starts at the next
//! free slot, not after the busy queue's buffered runs.

use std::time::Duration;

use chrono::{DateTime, Utc};
use runq_shared::{CreateRun, NewStep};
use serde_json::json;

use crate::support::process::Proc;
use crate::support::TestDb;

fn sleep_in(queue: &str, ms: u64) -> CreateRun {
    let mut run = CreateRun::new(vec![NewStep::new("s", "sleep", json!({ "ms": ms }))]);
    run.queue = queue.to_owned();
    run
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .expect("count")
}

/// A `runq worker` process drains 6,000 runs of 5 ms of queue `busy` at
/// concurrency 10 with the default prefetch. Once it is at speed it holds
/// hundreds of them claimed ahead (the buffer follows the start rate), and a
/// run then enqueued into queue `quiet` starts ahead of them: fewer `busy`
/// runs start between its enqueue and its start than the worker held
/// claimed when it was enqueued. (A FIFO buffer refilled only when it ran
/// low would start every held `busy` run first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_queues_run_starts_ahead_of_a_busy_queues_buffer() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    for _ in 0..6 {
        db.enqueue(tenant, (0..1_000).map(|_| sleep_in("busy", 5)).collect())
            .await;
    }
    let env = [("RUNQ_CONCURRENCY", "10"), ("RUNQ_QUEUES", "busy,quiet")];
    let mut worker = Proc::worker(&db.url, &env);
    db.wait_for("1,000 busy runs done", Duration::from_secs(60), || async {
        count(&db, "SELECT count(*) FROM runs WHERE status = 'succeeded'").await >= 1_000
    })
    .await;
    let held = count(
        &db,
        "SELECT count(*) FROM runs WHERE queue = 'busy' AND status = 'running'",
    )
    .await;
    let quiet = db
        .enqueue(tenant, vec![sleep_in("quiet", 0)])
        .await
        .remove(0);
    let enqueued = Utc::now();
    db.wait_for("the quiet run done", Duration::from_secs(60), || async {
        count(
            &db,
            "SELECT count(*) FROM runs WHERE queue = 'quiet' AND status = 'succeeded'",
        )
        .await
            == 1
    })
    .await;
    // Steps' start times are the worker's wall clock, as `enqueued` is this
    // process's: one host, one clock.
    let quiet_started: DateTime<Utc> =
        sqlx::query_scalar("SELECT started_at FROM run_steps WHERE run_id = $1")
            .bind(quiet.id)
            .fetch_one(&db.pool)
            .await
            .expect("quiet start");
    let overtaking: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM run_steps s JOIN runs r ON r.id = s.run_id
         WHERE r.queue = 'busy' AND s.started_at > $1 AND s.started_at < $2",
    )
    .bind(enqueued)
    .bind(quiet_started)
    .fetch_one(&db.pool)
    .await
    .expect("overtaking");
    worker.stop().await;
    assert!(
        held >= 100,
        "the worker held only {held} busy runs at speed: the buffer did not grow ({overtaking} overtook)"
    );
    assert!(
        overtaking < held / 2,
        "{overtaking} busy runs started between the quiet run's enqueue and its start; \
         the worker held {held}"
    );
}
