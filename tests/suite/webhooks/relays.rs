//! Relays on several workers cooperate, and one killed mid-batch loses nothing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nix::sys::signal::Signal;
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

/// Checks what `log` holds: every delivery verified; a repeated event id
/// carries the same body; each run's first arrivals are created, started,
/// succeeded in that order.
fn check_arrivals(log: &[Received], runs: usize) {
    assert!(log.iter().all(|r| r.verified), "every delivery verifies");
    let mut bodies: HashMap<&str, &str> = HashMap::new();
    for r in log {
        let id = r.webhook_id.as_deref().expect("webhook-id");
        let first = bodies.entry(id).or_insert(&r.body);
        assert_eq!(
            *first,
            r.body.as_str(),
            "a duplicate of {id} has another body"
        );
    }
    let mut per_run: HashMap<uuid::Uuid, Vec<String>> = HashMap::new();
    let mut seen = HashSet::new();
    for event in super::events(log) {
        if seen.insert(event.id.clone()) {
            per_run
                .entry(event.run.id)
                .or_default()
                .push(event.event_type.as_str().to_owned());
        }
    }
    assert_eq!(per_run.len(), runs);
    for (run, types) in per_run {
        assert_eq!(
            types,
            ["run.created", "run.started", "run.succeeded"],
            "run {run} arrived out of order: {:?}",
            log.iter()
                .filter(|r| r.body.contains(&run.to_string()))
                .map(|r| (r.webhook_id.clone(), r.status, r.at))
                .collect::<Vec<_>>()
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
    for worker in &mut workers {
        worker.stop().await;
    }
    check_arrivals(&log, 200);
    let attempts: i64 = db.scalar("SELECT count(*) FROM webhook_attempts").await;
    assert!(attempts >= 600, "{attempts} attempts for 600 events");
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
    let log = wait_for_distinct(&receiver, "/slow", 60, Duration::from_secs(60)).await;
    second.stop().await;
    check_arrivals(&log, 20);
    let events: Vec<RunEvent> = super::events(&log);
    assert!(events.len() >= 60);
}
