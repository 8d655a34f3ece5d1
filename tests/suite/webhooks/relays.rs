//! Relays on several workers cooperate, and one killed mid-batch loses nothing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nix::sys::signal::Signal;
use runq_shared::db::outbox;
use runq_shared::RunEvent;
use serde_json::json;

use super::{subscribe, wait_for_distinct};
use crate::support::process::Proc;
use crate::support::receiver::{Received, Receiver};
use crate::support::{echo_run, TestDb};

/// Worker processes with fast relays, loopback allowed.
fn relay_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("RUNQ_RELAY_POLL_MS", "20"),
        ("RUNQ_WEBHOOK_RETRY_BASE_MS", "50"),
        ("RUNQ_WEBHOOK_RETRY_MAX_MS", "200"),
        ("RUNQ_OUTBOUND_ALLOW", "127.0.0.0/8"),
    ]
}

/// Checks what `log` holds against the outbox: every delivery verified; a
/// repeated event id carries the same body; each run's first arrivals are
/// its outbox rows, in order.
async fn check_arrivals(db: &TestDb, log: &[Received], runs: usize) {
    // Only a request the kill cut short (an incomplete body) may fail to verify.
    for r in log.iter().filter(|r| !r.verified) {
        assert!(
            serde_json::from_str::<serde_json::Value>(&r.body).is_err(),
            "a complete delivery failed verification: {r:?}"
        );
    }
    let mut bodies: HashMap<&str, &str> = HashMap::new();
    for r in log.iter().filter(|r| r.verified) {
        let id = r.webhook_id.as_deref().expect("webhook-id");
        let first = bodies.entry(id).or_insert(&r.body);
        assert_eq!(
            *first,
            r.body.as_str(),
            "a duplicate of {id} has another body"
        );
    }
    let mut per_run: HashMap<uuid::Uuid, Vec<RunEvent>> = HashMap::new();
    let mut seen = HashSet::new();
    for event in super::events(log) {
        if seen.insert(event.id.clone()) {
            per_run.entry(event.run.id).or_default().push(event);
        }
    }
    assert_eq!(per_run.len(), runs);
    let mut conn = db.pool.acquire().await.expect("connection");
    for (run, arrived) in per_run {
        let expected: Vec<RunEvent> = outbox::for_run(&mut conn, run)
            .await
            .expect("outbox")
            .iter()
            .map(|row| row.published())
            .collect();
        assert_eq!(
            arrived, expected,
            "run {run}: arrivals against its outbox rows"
        );
    }
}

/// 200 runs with two worker processes relaying: every event is delivered,
/// none lost, duplicates only with the same event id, each run in order.
#[tokio::test]
async fn two_hundred_runs_with_two_relays_deliver_every_event() {
    let Some(receiver) = Receiver::start() else {
        return;
    };
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let (_, secret) = subscribe(&db, tenant, &receiver.url("/all"), &[]).await;
    receiver.route("/all", &secret, "ok", json!({})).await;
    let env = relay_env();
    let mut workers = [Proc::worker(&db.url, &env), Proc::worker(&db.url, &env)];
    db.enqueue(
        tenant,
        (0..200).map(|i| echo_run(json!({ "i": i }))).collect(),
    )
    .await;
    let log = wait_for_distinct(&receiver, "/all", 600, Duration::from_secs(60)).await;
    db.wait_for(
        "every delivery recorded",
        Duration::from_secs(20),
        || async {
            db.scalar::<i64>("SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'")
                .await
                == 600
        },
    )
    .await;
    for worker in &mut workers {
        worker.stop().await;
    }
    check_arrivals(&db, &log, 200).await;
}

/// A relay killed with SIGKILL while its deliveries are in flight loses
/// none of them: another relay takes each again when its lease ends, with
/// the same event id.
#[tokio::test]
async fn killing_a_relay_mid_batch_loses_nothing() {
    let Some(receiver) = Receiver::start() else {
        return;
    };
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let (_, secret) = subscribe(&db, tenant, &receiver.url("/slow"), &[]).await;
    // Each answer takes 500 ms, so a batch is in flight for a while.
    receiver
        .route("/slow", &secret, "ok", json!({ "delay_ms": 500 }))
        .await;
    let mut env = relay_env();
    env.push(("RUNQ_WEBHOOK_TIMEOUT_MS", "1000"));
    // Runs the kill cuts short come back soon.
    env.push(("RUNQ_LEASE_MS", "2000"));
    let mut first = Proc::worker(&db.url, &env);
    db.enqueue(
        tenant,
        (0..20).map(|i| echo_run(json!({ "i": i }))).collect(),
    )
    .await;
    db.wait_for("deliveries in flight", Duration::from_secs(20), || async {
        db.scalar::<i64>("SELECT count(*) FROM webhook_deliveries WHERE state = 'delivering'")
            .await
            >= 4
    })
    .await;
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(5)).await;
    let in_flight: i64 = db
        .scalar("SELECT count(*) FROM webhook_deliveries WHERE state = 'delivering'")
        .await;
    assert!(in_flight > 0, "the kill left deliveries in flight");
    let mut second = Proc::worker(&db.url, &env);
    // The kill may also have cut runs short: the second worker rescues and
    // finishes them, so wait for every run, then for every outbox row.
    db.wait_all_terminal(Duration::from_secs(60)).await;
    let rows: i64 = db.scalar("SELECT count(*) FROM outbox").await;
    let log = wait_for_distinct(&receiver, "/slow", rows as usize, Duration::from_secs(60)).await;
    second.stop().await;
    check_arrivals(&db, &log, 20).await;
}
