//! The outbox relay, run by every worker: fans new outbox rows out into
//! webhook deliveries (moving the shared cursor in the same transaction) and
//! sends the deliveries, signed as Standard Webhooks.
//!
//! Relays on many workers cooperate through Postgres alone: the fan-out takes
//! turns on the cursor row (`FOR UPDATE SKIP LOCKED`), and each delivery
//! attempt is claimed under a lease as long as the attempt's timeout, so a
//! relay killed mid-send loses nothing: its deliveries are taken again when
//! their leases end, and receivers see the same `webhook-id` twice at worst.
//!
//! Redirects are followed (up to [`outbound::MAX_REDIRECTS`]), each hop
//! judged by the outbound policy like the first address.
//!
//! Sends run as their own tasks, at most `relay_concurrency` per worker and
//! `webhook_in_flight` per subscription across the fleet, each bounded by
//! `webhook_timeout_ms`: a receiver that hangs delays only its own deliveries.

use std::time::{Duration, Instant};

use chrono::Utc;
use runq_shared::config::RelayConfig;
use runq_shared::db::webhooks::relay::{self, AttemptResult, Claimed, FanOut, Recorded};
use runq_shared::db::{outbox, DbError};
use runq_shared::model::{OutboxEvent, RunEvent};
use runq_shared::signing;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::outbound::{self, BodyError, OutboundPolicy};

/// Outbox rows one fan-out transaction moves past.
const FAN_OUT_BATCH: i64 = 1_000;
/// Most bytes of a receiver's reply read; a longer reply fails the attempt.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// Rows one prune statement deletes.
const PRUNE_BATCH: i64 = 1_000;
/// Extra lease beyond the attempt's timeout, for recording the result.
const LEASE_MARGIN_MS: u64 = 5_000;

/// Errors building a relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The HTTP client could not be built.
    #[error(transparent)]
    Outbound(#[from] outbound::OutboundError),
}

/// What one delivery pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Attempts that ended delivered.
    pub delivered: usize,
    /// Attempts that failed with attempts left.
    pub retrying: usize,
    /// Attempts that failed with none left.
    pub dead: usize,
    /// Attempts whose lease had ended before they were recorded.
    pub superseded: usize,
}

impl DeliveryReport {
    fn add(&mut self, recorded: Recorded) {
        match recorded {
            Recorded::Delivered => self.delivered += 1,
            Recorded::Retrying => self.retrying += 1,
            Recorded::Dead => self.dead += 1,
            Recorded::Superseded => self.superseded += 1,
        }
    }

    /// Attempts made.
    pub fn attempts(&self) -> usize {
        self.delivered + self.retrying + self.dead + self.superseded
    }
}

/// The relay of one worker.
#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    config: RelayConfig,
    policy: OutboundPolicy,
    client: reqwest::Client,
}

impl Relay {
    /// A relay sending through `policy` (which addresses may be reached).
    ///
    /// # Errors
    ///
    /// The HTTP client cannot be built.
    pub fn new(
        pool: PgPool,
        config: RelayConfig,
        policy: OutboundPolicy,
    ) -> Result<Self, RelayError> {
        let client = outbound::client(&policy, Duration::from_millis(config.webhook_timeout_ms))?;
        Ok(Self {
            pool,
            config,
            policy,
            client,
        })
    }

    /// Fans out everything readable now, a batch per transaction, until the
    /// cursor reaches the visibility horizon or another relay holds it.
    /// Returns the total.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn fan_out_once(&self) -> Result<FanOut, DbError> {
        let mut total = FanOut::default();
        loop {
            let mut tx = self.pool.begin().await?;
            let pass =
                relay::fan_out(&mut tx, FAN_OUT_BATCH, self.config.webhook_max_attempts).await?;
            tx.commit().await?;
            total.led |= pass.led;
            total.events += pass.events;
            total.deliveries += pass.deliveries;
            total.cursor = pass.cursor;
            if !pass.led || pass.events < FAN_OUT_BATCH {
                return Ok(total);
            }
        }
    }

    /// Claims up to `limit` due deliveries.
    async fn claim(&self, limit: usize) -> Result<Vec<Claimed>, DbError> {
        let mut conn = self.pool.acquire().await?;
        relay::claim(
            &mut conn,
            limit as i64,
            self.config.webhook_in_flight,
            (self.config.webhook_timeout_ms + LEASE_MARGIN_MS) as i64,
        )
        .await
    }

    /// Sends `claimed` once and records the attempt.
    async fn attempt(&self, claimed: Claimed) -> Result<Recorded, DbError> {
        let result = self.send(&claimed).await;
        if let Some(error) = &result.error {
            tracing::info!(delivery.id = claimed.id, webhook.id = %claimed.webhook_id,
                attempt = claimed.attempt, error = %error, "webhook delivery failed");
        }
        let mut conn = self.pool.acquire().await?;
        relay::record(
            &mut conn,
            &claimed,
            &result,
            self.config.webhook_retry_base_ms as f64,
            self.config.webhook_retry_max_ms as f64,
        )
        .await
    }

    /// One attempt: the signed POST, its outcome.
    async fn send(&self, claimed: &Claimed) -> AttemptResult {
        let started_at = Utc::now();
        let clock = Instant::now();
        let outcome = self.post(claimed).await;
        let duration_ms = i32::try_from(clock.elapsed().as_millis()).unwrap_or(i32::MAX);
        let (status_code, error) = match outcome {
            Ok(status) => (Some(status), None),
            Err((status, error)) => (status, Some(error)),
        };
        AttemptResult {
            started_at,
            duration_ms,
            status_code,
            error,
        }
    }

    /// The POST of one attempt: `Ok(status)` for a 2xx reply, else the
    /// status (if a reply came) and why the attempt failed.
    async fn post(&self, claimed: &Claimed) -> Result<i32, (Option<i32>, String)> {
        let event: OutboxEvent =
            serde_json::from_value(claimed.payload.clone()).map_err(|err| {
                (
                    None,
                    format!("the outbox payload does not match the event contract: {err}"),
                )
            })?;
        let event = RunEvent::from_outbox(claimed.event_id, event);
        let body = serde_json::to_vec(&event)
            .map_err(|err| (None, format!("the event does not serialise: {err}")))?;
        let url = reqwest::Url::parse(&claimed.url)
            .map_err(|err| (None, format!("url '{}' does not parse: {err}", claimed.url)))?;
        outbound::check_url(&self.policy, &url).map_err(|err| (None, err.to_string()))?;
        let timestamp = Utc::now().timestamp();
        let signature = signing::sign(&claimed.secret, &event.id, timestamp, &body)
            .map_err(|err| (None, err.to_string()))?;
        let reply = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|err| (None, describe(&err)))?;
        let status = i32::from(reply.status().as_u16());
        if reply.status().is_redirection() {
            let to = reply
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("nowhere")
                .to_owned();
            return Err((
                Some(status),
                format!("answered {status}, a redirect to '{to}' that was not followed"),
            ));
        }
        match outbound::read_capped(reply, MAX_REPLY_BYTES).await {
            Ok(_) => {}
            Err(BodyError::TooLarge { .. }) => {
                return Err((
                    Some(status),
                    format!("answered {status} with a reply body over {MAX_REPLY_BYTES} bytes"),
                ))
            }
            Err(BodyError::Read(err)) => return Err((Some(status), describe(&err))),
        }
        if (200..300).contains(&status) {
            Ok(status)
        } else {
            Err((Some(status), format!("answered {status}")))
        }
    }

    /// Claims what is due and sends it, waiting for every send: one pass, for
    /// tests and tools (the service overlaps sends instead).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn deliver_once(&self) -> Result<DeliveryReport, DbError> {
        let claimed = self.claim(self.config.relay_concurrency).await?;
        let mut sends = JoinSet::new();
        for delivery in claimed {
            let relay = self.clone();
            sends.spawn(async move { relay.attempt(delivery).await });
        }
        let mut report = DeliveryReport::default();
        while let Some(done) = sends.join_next().await {
            if let Ok(recorded) = done {
                report.add(recorded?);
            }
        }
        Ok(report)
    }

    /// Deletes published outbox rows and finished deliveries past their
    /// retention, in small batches. Returns how many rows went.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn prune_once(&self) -> Result<u64, DbError> {
        let mut conn = self.pool.acquire().await?;
        let mut total = 0;
        let outbox_seconds = self.config.outbox_retention_hours * 3600.0;
        loop {
            let gone = outbox::prune(&mut conn, outbox_seconds, PRUNE_BATCH).await?;
            total += gone;
            if gone < PRUNE_BATCH as u64 {
                break;
            }
        }
        let delivery_seconds = self.config.delivery_retention_hours * 3600.0;
        loop {
            let gone = relay::prune(&mut conn, delivery_seconds, PRUNE_BATCH).await?;
            total += gone;
            if gone < PRUNE_BATCH as u64 {
                break;
            }
        }
        Ok(total)
    }

    /// Fans out, sends and prunes until `shutdown` fires. Sends in flight at
    /// shutdown are dropped; their leases end and another relay sends them.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a fan-out interrupted mid-transaction rolls back, and an
    /// interrupted send is taken again when its lease ends.
    pub async fn run(self, shutdown: CancellationToken) {
        let poll = Duration::from_millis(self.config.relay_poll_ms.max(1));
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune_tick =
            tokio::time::interval(Duration::from_millis(self.config.outbox_prune_ms));
        prune_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sends: JoinSet<Result<Recorded, DbError>> = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(err) = self.fan_out_once().await {
                        tracing::warn!(error = %err, "outbox fan-out failed");
                    }
                }
                Some(done) = sends.join_next(), if !sends.is_empty() => {
                    match done {
                        Ok(Err(err)) => tracing::warn!(error = %err, "recording a webhook attempt failed"),
                        Err(err) if err.is_panic() => tracing::error!("a webhook send panicked"),
                        _ => {}
                    }
                }
                _ = prune_tick.tick() => {
                    match self.prune_once().await {
                        Ok(0) => {}
                        Ok(pruned) => tracing::info!(pruned, "pruned the outbox and finished deliveries"),
                        Err(err) => tracing::warn!(error = %err, "outbox prune failed"),
                    }
                }
            }
            let room = self.config.relay_concurrency.saturating_sub(sends.len());
            if room > 0 {
                match self.claim(room).await {
                    Ok(claimed) => {
                        for delivery in claimed {
                            let relay = self.clone();
                            sends.spawn(async move { relay.attempt(delivery).await });
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "claiming webhook deliveries failed"),
                }
            }
        }
    }
}

/// A reqwest error in words, with its source chain (a timeout says so).
fn describe(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        return "timed out".to_owned();
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
