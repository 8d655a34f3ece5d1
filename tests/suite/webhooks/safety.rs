//! Outbound safety of deliveries: internal addresses are refused without
//! the allow-list, and a receiver that hangs, answers 10 MB or redirects to
//! a private address fails with the reason recorded, delaying no other
//! subscription.

use std::time::Duration;

use runq_shared::{Delivery, DeliveryState, EventType};
use runq_worker::Worker;
use serde_json::json;

use super::{deliveries, subscribe, worker_config};
use crate::support::receiver::Receiver;
use crate::support::{self, echo_run, RunningWorker, TestDb};

/// The first attempt's error of every delivery of `webhook`, once each has one.
async fn first_errors(
    db: &TestDb,
    tenant: runq_shared::TenantId,
    webhook: uuid::Uuid,
    n: usize,
) -> Vec<String> {
    support::wait_for_value("attempts recorded", Duration::from_secs(20), || async {
        let all = deliveries(db, tenant, webhook).await;
        let errors: Vec<String> = all
            .iter()
            .filter_map(|d| d.attempt_log.first()?.error.clone())
            .collect();
        (errors.len() >= n).then_some(errors)
    })
    .await
}

/// Webhooks aimed at the metadata address, a private network and a host
/// name resolving to loopback are refused when the worker's allow-list is
/// empty; the local receiver behind `localhost` gets nothing.
#[tokio::test]
async fn webhooks_to_internal_addresses_are_refused_without_the_allow_list() {
    let Some(receiver) = Receiver::start() else {
        return;
    };
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let port = receiver.base.rsplit(':').next().expect("port").to_owned();
    let targets = [
        "http://169.254.169.254/latest/meta-data".to_owned(),
        "http://10.0.0.1/hook".to_owned(),
        format!("http://localhost:{port}/hook"),
    ];
    let mut hooks = Vec::new();
    for url in &targets {
        let (webhook, secret) = subscribe(&db, tenant, url, &[EventType::Created]).await;
        receiver.route("/hook", &secret, "ok", json!({})).await;
        hooks.push(webhook);
    }
    let config = runq_shared::config::WorkerConfig {
        outbound_allow: Vec::new(),
        ..worker_config(2)
    };
    let worker = RunningWorker::start(Worker::new(db.pool.clone(), config));
    db.enqueue(tenant, vec![echo_run(json!({}))]).await;
    for (webhook, url) in hooks.iter().zip(&targets) {
        let errors = first_errors(&db, tenant, webhook.id, 1).await;
        assert!(
            errors[0].contains("refused address"),
            "{url}: {}",
            errors[0]
        );
    }
    worker.stop().await;
    assert!(
        receiver.log().await.is_empty(),
        "the receiver got a request"
    );
}

/// Three bad receivers (one hangs, one answers 10 MB, one redirects to a
/// private address) beside a good one: the bad deliveries fail with their
/// reasons, and the good subscription's deliveries are not held up by them.
#[tokio::test]
async fn bad_receivers_fail_with_reasons_and_delay_no_other_subscription() {
    let Some(receiver) = Receiver::start() else {
        return;
    };
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let created = [EventType::Created];
    let (hang, hang_secret) = subscribe(&db, tenant, &receiver.url("/hang"), &created).await;
    let (big, big_secret) = subscribe(&db, tenant, &receiver.url("/big"), &created).await;
    let (redirect, redirect_secret) =
        subscribe(&db, tenant, &receiver.url("/redirect"), &created).await;
    let (good, good_secret) = subscribe(&db, tenant, &receiver.url("/good"), &created).await;
    receiver
        .route("/hang", &hang_secret, "hang", json!({}))
        .await;
    receiver.route("/big", &big_secret, "big", json!({})).await;
    receiver
        .route(
            "/redirect",
            &redirect_secret,
            "redirect",
            json!({ "location": "http://10.0.0.1/steal" }),
        )
        .await;
    receiver.route("/good", &good_secret, "ok", json!({})).await;

    let mut config = worker_config(2);
    config.relay.webhook_timeout_ms = 1_000;
    let timeout = chrono::Duration::milliseconds(1_000);
    let worker = RunningWorker::start(Worker::new(db.pool.clone(), config));
    db.enqueue(
        tenant,
        (0..10).map(|i| echo_run(json!({ "i": i }))).collect(),
    )
    .await;

    let good_ones: Vec<Delivery> =
        support::wait_for_value("good deliveries", Duration::from_secs(20), || async {
            let all = deliveries(&db, tenant, good.id).await;
            (all.len() == 10 && all.iter().all(|d| d.state == DeliveryState::Delivered))
                .then_some(all)
        })
        .await;
    for delivery in &good_ones {
        let waited = delivery.finished_at.expect("finished") - delivery.created_at;
        assert!(
            waited < timeout,
            "a good delivery waited {waited} behind the bad receivers"
        );
    }
    let hang_errors = first_errors(&db, tenant, hang.id, 1).await;
    assert!(
        hang_errors.iter().all(|e| e == "timed out"),
        "{hang_errors:?}"
    );
    let big_errors = first_errors(&db, tenant, big.id, 1).await;
    assert!(
        big_errors.iter().all(|e| e.contains("reply body over")),
        "{big_errors:?}"
    );
    let redirect_errors = first_errors(&db, tenant, redirect.id, 1).await;
    assert!(
        redirect_errors
            .iter()
            .all(|e| e.contains("10.0.0.1") && e.contains("refused")),
        "{redirect_errors:?}"
    );
    // The hanging receiver held at most its in-flight share of senders.
    let in_flight: i64 = db
        .scalar(&format!(
            "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = '{}' AND state = 'delivering'",
            hang.id
        ))
        .await;
    assert!(
        in_flight <= 4,
        "{in_flight} deliveries to the hanging receiver in flight"
    );
    worker.stop().await;
}
