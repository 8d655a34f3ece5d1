//! A worker whose clock is skewed (faketime).

use super::*;

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
