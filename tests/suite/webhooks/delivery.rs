//! Deliveries reach a receiver signed, in order per run, retried with
//! backoff, dead after the last attempt, and redelivered on request.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use reqwest::StatusCode;
use runq_shared::db::outbox;
use runq_shared::{DeliveryState, EventType, RunEvent};
use runq_worker::Worker;
use serde_json::{json, Value};

use super::{deliveries, subscribe, wait_for_distinct, worker_config};
use crate::support::http::Served;
use crate::support::receiver::Receiver;
use crate::support::{self, echo_run, token, RunningWorker, TestDb};

/// Every topic of a run's life reaches a receiver subscribed through the
/// API: each body is the outbox row's `RunEvent`, each signature verifies
/// with the reference library, and each run's events arrive in the order its
/// outbox rows were written.
#[tokio::test]
async fn every_topic_reaches_the_receiver_in_order_and_verified() {
    let Some(receiver) = Receiver::start() else {
        return;
    };
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let bearer = token(&db, tenant).await;
    let served = Served::start(db, bearer);
    let db = &served.db;

    let reply = served
        .post("/v1/webhooks", &json!({ "url": receiver.url("/all") }))
        .await;
    assert_eq!(reply.status(), StatusCode::CREATED);
    let created: Value = reply.json().await.expect("created webhook");
    let secret = created["secret"].as_str().expect("secret shown once");
    receiver.route("/all", secret, "ok", json!({})).await;

    // A 600 ms duration cap stops the sleeps; a 100 ms grace hands one back.
    let config = || runq_shared::config::WorkerConfig {
        max_run_duration_minutes: 0.01,
        shutdown_grace_ms: 100,
        ..worker_config(4)
    };
    let first = RunningWorker::start(Worker::new(db.pool.clone(), config()));
    let submit = |body: Value| {
        let served = &served;
        async move {
            let reply = served.post("/v1/runs", &body).await;
            assert_eq!(reply.status(), StatusCode::CREATED, "{body}");
            let run: Value = reply.json().await.expect("run");
            run["id"].as_str().expect("id").to_owned()
        }
    };
    let step = |kind: &str, input: Value| json!({ "name": kind, "kind": kind, "input": input });
    let succeeds = submit(json!({ "steps": [step("echo", json!({ "a": 1 }))] })).await;
    let fails = submit(json!({ "steps": [step("fail", json!({}))], "max_attempts": 2 })).await;
    let stopped = submit(json!({ "steps": [step("sleep", json!({ "ms": 5000 }))] })).await;
    let cancelled = submit(json!({
        "steps": [step("echo", json!({}))],
        "run_at": (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339(),
    }))
    .await;
    let reply = served
        .post(&format!("/v1/runs/{cancelled}/cancel"), &json!({}))
        .await;
    assert!(reply.status().is_success());
    db.wait_for("three runs end", Duration::from_secs(20), || async {
        db.scalar::<i64>(
            "SELECT count(*) FROM runs WHERE status IN ('succeeded', 'failed', 'stopped_quota')",
        )
        .await
            == 3
    })
    .await;
    let reply = served
        .post(&format!("/v1/runs/{fails}/retry"), &json!({}))
        .await;
    assert!(reply.status().is_success());
    // Hand one back: a sleep in flight when the first worker stops.
    let released = submit(json!({ "steps": [step("sleep", json!({ "ms": 5000 }))] })).await;
    db.wait_for("the sleep starts", Duration::from_secs(10), || async {
        db.scalar::<i64>("SELECT count(*) FROM runs WHERE status = 'running'")
            .await
            == 1
    })
    .await;
    first.stop().await;
    let second = RunningWorker::start(Worker::new(db.pool.clone(), config()));
    db.wait_all_terminal(Duration::from_secs(30)).await;

    let total: i64 = db.scalar("SELECT count(*) FROM outbox").await;
    let log = wait_for_distinct(&receiver, "/all", total as usize, Duration::from_secs(30)).await;
    second.stop().await;
    assert!(log.iter().all(|r| r.verified), "every delivery verifies");

    // Arrival order per run, duplicates dropped, against the outbox.
    let mut arrived: HashMap<uuid::Uuid, Vec<RunEvent>> = HashMap::new();
    let mut seen = BTreeSet::new();
    for (received, event) in log.iter().zip(super::events(&log)) {
        assert_eq!(received.webhook_id.as_deref(), Some(event.id.as_str()));
        if seen.insert(event.id.clone()) {
            arrived.entry(event.run.id).or_default().push(event);
        }
    }
    let mut conn = db.pool.acquire().await.expect("connection");
    let mut types = BTreeSet::new();
    for id in [&succeeds, &fails, &stopped, &cancelled, &released] {
        let id: uuid::Uuid = id.parse().expect("uuid");
        let rows = outbox::for_run(&mut conn, id).await.expect("outbox");
        let expected: Vec<RunEvent> = rows.iter().map(|row| row.published()).collect();
        assert_eq!(
            arrived.get(&id),
            Some(&expected),
            "run {id}: order and bodies"
        );
        types.extend(expected.iter().map(|e| e.event_type.as_str()));
    }
    let all: BTreeSet<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
    assert_eq!(types, all, "every topic was delivered");
}

/// What the receiver answers is up to it: a body changed in transit, or a
/// signature made for a timestamp ten minutes old, is refused by the
/// reference verifier.
#[tokio::test]
async fn tampered_bodies_and_stale_timestamps_fail_verification() {
    let Some(receiver) = Receiver::start() else {
        return;
    };
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let (_, secret) = subscribe(&db, tenant, &receiver.url("/hook"), &[]).await;
    receiver.route("/hook", &secret, "ok", json!({})).await;
    let worker = RunningWorker::start(Worker::new(db.pool.clone(), worker_config(2)));
    db.enqueue(tenant, vec![echo_run(json!({}))]).await;
    let log = wait_for_distinct(&receiver, "/hook", 3, Duration::from_secs(20)).await;
    worker.stop().await;
    let genuine = &log[0];
    let id = genuine.webhook_id.clone().expect("webhook-id");
    let timestamp = genuine.webhook_timestamp.clone().expect("timestamp");
    let signature = genuine.webhook_signature.clone().expect("signature");
    let client = reqwest::Client::new();
    let send = |body: String, timestamp: String, signature: String| {
        client
            .post(receiver.url("/hook"))
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .body(body)
            .send()
    };

    let tampered = genuine.body.replace("\"attempt\":", "\"attempt\": ");
    assert_ne!(tampered, genuine.body);
    let reply = send(tampered, timestamp.clone(), signature.clone())
        .await
        .expect("send");
    assert_eq!(reply.status(), StatusCode::BAD_REQUEST);

    let stale = chrono::Utc::now().timestamp() - 600;
    let stale_signature =
        runq_shared::signing::sign(&secret, &id, stale, genuine.body.as_bytes()).expect("sign");
    let reply = send(genuine.body.clone(), stale.to_string(), stale_signature)
        .await
        .expect("send");
    assert_eq!(reply.status(), StatusCode::BAD_REQUEST);

    // And the genuine request, replayed now, still verifies.
    let reply = send(genuine.body.clone(), timestamp, signature)
        .await
        .expect("send");
    assert_eq!(reply.status(), StatusCode::OK);

    let log = receiver.log_of("/hook").await;
    let errors: Vec<&str> = log.iter().filter_map(|r| r.error.as_deref()).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("No matching signature"), "{errors:?}");
    assert!(errors[1].contains("too old"), "{errors:?}");
}

/// A receiver that fails the first three deliveries gets the event on the
/// fourth; each attempt is in the delivery's log.
#[tokio::test]
async fn a_receiver_failing_three_times_gets_the_event_on_the_fourth_attempt() {
    let Some(receiver) = Receiver::start() else {
        return;
    };
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let (webhook, secret) =
        subscribe(&db, tenant, &receiver.url("/flaky"), &[EventType::Created]).await;
    receiver
        .route("/flaky", &secret, "ok", json!({ "fail_first": 3 }))
        .await;
    let worker = RunningWorker::start(Worker::new(db.pool.clone(), worker_config(2)));
    let run = db
        .enqueue(tenant, vec![echo_run(json!({}))])
        .await
        .remove(0);
    let delivered = support::wait_for_value("delivered", Duration::from_secs(20), || async {
        let all = deliveries(&db, tenant, webhook.id).await;
        all.into_iter()
            .find(|d| d.state == DeliveryState::Delivered)
    })
    .await;
    worker.stop().await;
    assert_eq!(delivered.run_id, run.id);
    assert_eq!(delivered.attempts, 4);
    let statuses: Vec<Option<i32>> = delivered
        .attempt_log
        .iter()
        .map(|a| a.status_code)
        .collect();
    assert_eq!(statuses, [Some(500), Some(500), Some(500), Some(200)]);
    assert!(delivered.attempt_log[..3]
        .iter()
        .all(|a| a.error.as_deref() == Some("answered 500")));
    assert!(delivered.attempt_log[3].error.is_none());
    let log = receiver.log_of("/flaky").await;
    assert_eq!(log.len(), 4);
    assert!(log
        .iter()
        .all(|r| r.verified && r.webhook_id == log[0].webhook_id));
}

/// A receiver that always fails ends dead after the allowed attempts,
/// visible through the API; a redelivery once it recovers delivers it.
#[tokio::test]
async fn an_always_failing_receiver_ends_dead_and_redelivery_delivers() {
    let Some(receiver) = Receiver::start() else {
        return;
    };
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let bearer = token(&db, tenant).await;
    let served = Served::start(db, bearer);
    let db = &served.db;
    let (webhook, secret) =
        subscribe(db, tenant, &receiver.url("/down"), &[EventType::Created]).await;
    receiver.route("/down", &secret, "fail", json!({})).await;
    let worker = RunningWorker::start(Worker::new(db.pool.clone(), worker_config(2)));
    db.enqueue(tenant, vec![echo_run(json!({}))]).await;
    let path = format!("/v1/webhooks/{}/deliveries", webhook.id);
    let dead: Value = support::wait_for_value("dead", Duration::from_secs(20), || async {
        let page: Value = served
            .get(&format!("{path}?state=dead"))
            .await
            .json()
            .await
            .ok()?;
        page["deliveries"].as_array()?.first().cloned()
    })
    .await;
    assert_eq!(dead["attempts"], 4, "{dead}");
    assert_eq!(dead["attempt_log"].as_array().map(Vec::len), Some(4));
    assert!(dead["next_attempt_at"].is_null());
    assert_eq!(receiver.log_of("/down").await.len(), 4);

    receiver.route("/down", &secret, "ok", json!({})).await;
    let id = dead["id"].as_i64().expect("id");
    let reply = served
        .post(&format!("{path}/{id}/redeliver"), &json!({}))
        .await;
    assert_eq!(reply.status(), StatusCode::ACCEPTED);
    support::wait_for_value("redelivered", Duration::from_secs(20), || async {
        let page: Value = served
            .get(&format!("{path}?state=delivered"))
            .await
            .json()
            .await
            .ok()?;
        page["deliveries"].as_array()?.first().cloned()
    })
    .await;
    worker.stop().await;
    let log = receiver.log_of("/down").await;
    assert_eq!(log.len(), 5);
    assert_eq!(log[4].status, Some(200));

    // Another tenant sees none of it.
    let other = served.db.tenant("other").await;
    let other_token = token(&served.db, other).await;
    let reply = served
        .client
        .get(served.url(&path))
        .bearer_auth(other_token)
        .send()
        .await
        .expect("send");
    assert_eq!(reply.status(), StatusCode::NOT_FOUND);
}
