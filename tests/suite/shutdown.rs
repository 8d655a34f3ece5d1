//! Graceful shutdown of a real `runq worker` process.

use std::time::Duration;

use runq_shared::{CreateRun, NewStep};
use serde_json::json;

use crate::support::process::Proc;
use crate::support::{status_and_attempt, TestDb};

fn sleep_run(ms: u64) -> CreateRun {
    CreateRun::new(vec![
        NewStep::new("nap", "sleep", json!({ "ms": ms })),
        NewStep::new("after", "echo", json!({ "done": true })),
    ])
}

/// SIGTERM mid-run: the run finishes within the grace period, the process
/// exits 0, nothing is lost.
#[tokio::test]
async fn sigterm_lets_in_flight_run_finish_within_grace() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let mut worker = Proc::worker(&db.url, &[("RUNQ_SHUTDOWN_GRACE_MS", "20000")]);
    let run = db.enqueue(tenant, vec![sleep_run(1_500)]).await.remove(0);
    db.wait_for("the run to start", Duration::from_secs(20), || async {
        db.count_status("running").await == 1
    })
    .await;

    let status = worker.stop().await;

    assert!(status.success(), "exit status {status}");
    assert_eq!(
        status_and_attempt(&db, run.id).await,
        ("succeeded".to_owned(), 1)
    );
}

/// SIGTERM with a grace period shorter than the run: the run goes back to
/// pending without charging the attempt, the process exits 0, and another
/// worker later completes it on attempt 1.
#[tokio::test]
async fn sigterm_hands_unfinished_run_back_without_charging_an_attempt() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let mut worker = Proc::worker(&db.url, &[("RUNQ_SHUTDOWN_GRACE_MS", "300")]);
    let run = db.enqueue(tenant, vec![sleep_run(60_000)]).await.remove(0);
    db.wait_for("the run to start", Duration::from_secs(20), || async {
        db.count_status("running").await == 1
    })
    .await;

    let status = worker.stop().await;

    assert!(status.success(), "exit status {status}");
    let locked_by: Option<uuid::Uuid> = db
        .scalar(&format!(
            "SELECT locked_by FROM runs WHERE id = '{}'",
            run.id
        ))
        .await;
    assert_eq!(locked_by, None);
    assert_eq!(
        status_and_attempt(&db, run.id).await,
        ("pending".to_owned(), 0)
    );
    let released: i64 = db
        .scalar("SELECT count(*) FROM outbox WHERE event_type = 'run.released'")
        .await;
    assert_eq!(released, 1);

    // Another worker picks it up and finishes it (shortened so the test is quick).
    db.execute("UPDATE run_steps SET input = '{\"ms\": 10}' WHERE position = 0")
        .await;
    let mut second = Proc::worker(&db.url, &[]);
    db.wait_all_terminal(Duration::from_secs(20)).await;
    second.stop().await;
    assert_eq!(
        status_and_attempt(&db, run.id).await,
        ("succeeded".to_owned(), 1),
        "the hand-back cost no attempt"
    );
}
