//! The client subcommands as a shell sees them: real `runq enqueue`,
//! `status` and `tail` processes against an API served in this process.

use std::time::Duration;

use runq_shared::{CreateRun, NewStep};
use runq_worker::Worker;
use serde_json::json;

use crate::support::{token, worker_config, RunningWorker, TestApi, TestDb};

/// What a finished `runq` process left: exit code, stdout, stderr.
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `runq <args>` against the API at `base` as `token` (through
/// `RUNQ_URL` and `RUNQ_TOKEN`, as the README has it), for at most 30 s.
async fn runq(base: &str, token: &str, args: &[&str]) -> Output {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_runq"))
            .args(args)
            .env("RUNQ_URL", base)
            .env("RUNQ_TOKEN", token)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("runq {args:?} did not finish within 30 s"))
    .expect("run runq");
    Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `runq status` and `runq tail` exit 0 for a succeeded run, 3 for a failed
/// one, 4 for a cancelled one and 5 for one stopped by its duration cap;
/// `tail` follows a run until it ends, and both show why it failed.
/// `runq enqueue` prints the id alone, so `ID=$(runq enqueue ...)` works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_and_tail_exit_codes_say_how_the_run_ended() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let token = token(&db, tenant).await;
    let api = TestApi::start(db.pool.clone(), TestApi::config());

    let enqueued = runq(&api.base, &token, &["enqueue", "--step", r#"echo:{"x":1}"#]).await;
    assert_eq!(enqueued.code, Some(0), "{}", enqueued.stderr);
    let succeeded: uuid::Uuid = enqueued
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("enqueue printed the id alone: {:?}", enqueued.stdout));
    let mut failing = CreateRun::new(vec![NewStep::new(
        "boom",
        "fail",
        json!({ "message": "the disk is full" }),
    )]);
    failing.max_attempts = 2;
    let mut capped = CreateRun::new(vec![NewStep::new("nap", "sleep", json!({ "ms": 60_000 }))]);
    capped.timeout_seconds = Some(1);
    // Not due for an hour: still pending when cancelled.
    let mut later = CreateRun::new(vec![NewStep::new("e", "echo", json!({}))]);
    later.run_at = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    let runs = db.enqueue(tenant, vec![failing, capped, later]).await;
    let (failed, stopped, cancelled) = (runs[0].id, runs[1].id, runs[2].id);

    // Tails start alongside the worker: each follows its run to the end,
    // however far the run got before the tail began.
    let tails: Vec<_> = [succeeded, failed, stopped, cancelled]
        .into_iter()
        .map(|id| {
            let (base, token) = (api.base.clone(), token.clone());
            tokio::spawn(async move { runq(&base, &token, &["tail", &id.to_string()]).await })
        })
        .collect();
    let worker = RunningWorker::start(Worker::new(db.new_pool(4), worker_config(4)));
    let response = reqwest::Client::new()
        .post(format!("{}/v1/runs/{cancelled}/cancel", api.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("cancel");
    assert!(
        response.status().is_success(),
        "cancel: {}",
        response.status()
    );
    db.wait_all_terminal(Duration::from_secs(30)).await;
    worker.stop().await;

    let expected = [
        (0, "succeeded"),
        (3, "failed"),
        (5, "stopped_quota"),
        (4, "cancelled"),
    ];
    for (tail, (code, status)) in tails.into_iter().zip(expected) {
        let tail = tail.await.expect("tail task");
        assert_eq!(
            tail.code,
            Some(code),
            "tail of a {status} run: {}",
            tail.stderr
        );
        let last = tail.stdout.lines().last().unwrap_or_default();
        assert!(
            last.contains(&format!(r#""status":"{status}""#)),
            "tail ends with the run: {}",
            tail.stdout
        );
    }
    for (id, code, status) in [
        (succeeded, 0, "succeeded"),
        (failed, 3, "failed"),
        (stopped, 5, "stopped_quota"),
        (cancelled, 4, "cancelled"),
    ] {
        let shown = runq(&api.base, &token, &["status", &id.to_string()]).await;
        assert_eq!(
            shown.code,
            Some(code),
            "status of a {status} run: {}",
            shown.stderr
        );
        assert!(
            shown.stdout.starts_with(&format!("run {id}  {status}  ")),
            "{}",
            shown.stdout
        );
    }
    let failed_status = runq(&api.base, &token, &["status", &failed.to_string()]).await;
    assert!(
        failed_status
            .stdout
            .contains("step_failed: the disk is full"),
        "status says why the run failed: {}",
        failed_status.stdout
    );
    let json = runq(
        &api.base,
        &token,
        &["status", "--json", &failed.to_string()],
    )
    .await;
    assert_eq!(json.code, Some(3));
    let document: serde_json::Value = serde_json::from_str(&json.stdout).expect("--json is JSON");
    assert_eq!(document["status"], "failed");
}
