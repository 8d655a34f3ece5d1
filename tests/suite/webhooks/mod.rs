//! Webhooks: the relay fans the outbox out into signed deliveries; a Python
//! receiver verifies them with the Standard Webhooks reference library.

mod api;
mod delivery;
mod relays;
mod safety;

use std::time::Duration;

use runq_shared::config::{RelayConfig, WorkerConfig};
use runq_shared::db;
use runq_shared::{CreateWebhook, Delivery, EventType, RunEvent, TenantId, Webhook};
use uuid::Uuid;

use crate::support::{self, receiver::Received, TestDb};

/// Relay settings for tests: quick passes, quick retries, a short timeout.
pub fn relay_config() -> RelayConfig {
    RelayConfig {
        relay_poll_ms: 20,
        webhook_retry_base_ms: 50,
        webhook_retry_max_ms: 200,
        webhook_timeout_ms: 2_000,
        webhook_max_attempts: 4,
        ..RelayConfig::default()
    }
}

/// A test worker whose relay uses [`relay_config`].
pub fn worker_config(concurrency: usize) -> WorkerConfig {
    WorkerConfig {
        relay: relay_config(),
        ..support::worker_config(concurrency)
    }
}

/// Subscribes `tenant` to `topics` (all when empty) at `url`; returns the
/// subscription and its secret.
pub async fn subscribe(
    db: &TestDb,
    tenant: TenantId,
    url: &str,
    topics: &[EventType],
) -> (Webhook, String) {
    let secret = runq_shared::signing::new_secret();
    let mut tx = db.pool.begin().await.expect("begin");
    let webhook = db::webhooks::create(
        &mut tx,
        tenant,
        &CreateWebhook {
            url: url.to_owned(),
            topics: Some(topics.to_vec()),
            description: None,
            enabled: None,
        },
        &secret,
    )
    .await
    .expect("subscribe");
    tx.commit().await.expect("commit");
    (webhook, secret)
}

/// Every delivery of `webhook` (newest first), with attempts.
pub async fn deliveries(db: &TestDb, tenant: TenantId, webhook: Uuid) -> Vec<Delivery> {
    let mut conn = db.pool.acquire().await.expect("connection");
    db::webhooks::list_deliveries(&mut conn, tenant, webhook, None, None, 500)
        .await
        .expect("deliveries")
        .deliveries
}

/// The bodies of verified deliveries, parsed as the contract type.
pub fn events(received: &[Received]) -> Vec<RunEvent> {
    received
        .iter()
        .filter(|r| r.verified)
        .map(|r| {
            serde_json::from_str(&r.body)
                .unwrap_or_else(|e| panic!("body {} breaks the RunEvent contract: {e}", r.body))
        })
        .collect()
}

/// Waits until `path` of `receiver` has `n` verified deliveries with
/// distinct event ids; returns everything it received.
pub async fn wait_for_distinct(
    receiver: &support::receiver::Receiver,
    path: &str,
    n: usize,
    limit: Duration,
) -> Vec<Received> {
    let got = support::poll(limit, || async {
        let log = receiver.log_of(path).await;
        let distinct: std::collections::HashSet<_> = log
            .iter()
            .filter(|r| r.verified)
            .filter_map(|r| r.webhook_id.clone())
            .collect();
        (distinct.len() >= n).then_some(log)
    })
    .await;
    match got {
        Some(log) => log,
        None => {
            let log = receiver.log_of(path).await;
            panic!(
                "{path} got {} requests, expected {n} distinct verified events: {:?}",
                log.len(),
                log.iter().take(5).collect::<Vec<_>>()
            )
        }
    }
}
