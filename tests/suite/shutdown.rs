//! Graceful shutdown of a real `runq worker` process.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use runq_shared::{CreateRun, NewStep};
use serde_json::json;

use crate::support::TestDb;

/// Starts `runq worker` on `db` with extra environment.
pub fn spawn_worker(db: &TestDb, env: &[(&str, &str)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_runq"));
    command
        .arg("worker")
        .env("DATABASE_URL", &db.url)
        .env("RUNQ_POLL_INTERVAL_MS", "50")
        .env("RUNQ_MAINTENANCE_MS", "100")
        .env("RUNQ_HEARTBEAT_MS", "200")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (key, value) in env {
        command.env(key, value);
    }
    command.spawn().expect("spawn runq worker")
}

/// Waits for `child` to exit, at most `limit`; kills it and panics otherwise.
pub async fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("worker did not exit within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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
    let mut worker = spawn_worker(&db, &[("RUNQ_SHUTDOWN_GRACE_MS", "20000")]);
    let run = db.enqueue(tenant, vec![sleep_run(1_500)]).await.remove(0);
    db.wait_for("the run to start", Duration::from_secs(20), || async {
        db.count_status("running").await == 1
    })
    .await;

    kill(Pid::from_raw(worker.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = wait_exit(&mut worker, Duration::from_secs(20)).await;

    assert!(status.success(), "exit status {status}");
    let (state, attempt): (String, i32) =
        sqlx::query_as("SELECT status::text, attempt FROM runs WHERE id = $1")
            .bind(run.id)
            .fetch_one(&db.pool)
            .await
            .expect("run");
    assert_eq!((state.as_str(), attempt), ("succeeded", 1));
}

/// SIGTERM with a grace period shorter than the run: the run goes back to
/// pending without charging the attempt, the process exits 0, and another
/// worker later completes it.
#[tokio::test]
async fn sigterm_hands_unfinished_run_back_without_charging_an_attempt() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let mut worker = spawn_worker(&db, &[("RUNQ_SHUTDOWN_GRACE_MS", "300")]);
    let run = db.enqueue(tenant, vec![sleep_run(60_000)]).await.remove(0);
    db.wait_for("the run to start", Duration::from_secs(20), || async {
        db.count_status("running").await == 1
    })
    .await;

    kill(Pid::from_raw(worker.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = wait_exit(&mut worker, Duration::from_secs(20)).await;

    assert!(status.success(), "exit status {status}");
    let (state, attempt, locked_by): (String, i32, Option<uuid::Uuid>) =
        sqlx::query_as("SELECT status::text, attempt, locked_by FROM runs WHERE id = $1")
            .bind(run.id)
            .fetch_one(&db.pool)
            .await
            .expect("run");
    assert_eq!((state.as_str(), attempt, locked_by), ("pending", 0, None));
    let released: i64 = db
        .scalar("SELECT count(*) FROM outbox WHERE event_type = 'run.released'")
        .await;
    assert_eq!(released, 1);

    // Another worker picks it up and finishes it (shortened so the test is quick).
    db.execute("UPDATE run_steps SET input = '{\"ms\": 10}' WHERE position = 0")
        .await;
    let mut second = spawn_worker(&db, &[]);
    db.wait_all_terminal(Duration::from_secs(20)).await;
    kill(Pid::from_raw(second.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    wait_exit(&mut second, Duration::from_secs(20)).await;
    let (state, attempt): (String, i32) =
        sqlx::query_as("SELECT status::text, attempt FROM runs WHERE id = $1")
            .bind(run.id)
            .fetch_one(&db.pool)
            .await
            .expect("run");
    assert_eq!(
        (state.as_str(), attempt),
        ("succeeded", 1),
        "the hand-back cost no attempt"
    );
}
