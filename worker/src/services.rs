//! The services every worker runs beside its claim loop: the listener
//! (wake-ups and cancels), the heartbeat, and the lease guard.

use std::sync::Arc;
use std::time::Duration;

use runq_shared::db::runs;
use runq_shared::db::sequences::SEQUENCE_CHANNEL;
use runq_shared::db::{workers, DbError, CANCEL_CHANNEL, PENDING_CHANNEL};
use runq_shared::WorkerId;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::leases::Leases;

/// Delay before the next try after `failures` failures in a row of a claim or
/// a listener connection: 200 ms doubling up to 5 s.
pub(crate) fn retry_delay(failures: u32) -> Duration {
    Duration::from_millis((100u64 << failures.min(6)).min(5_000))
}

/// How long before its local lease deadline a run is dropped: a tenth of the
/// lease, at least 50 ms. It covers the time the abort takes to reach the
/// step in flight, so the step stops before the database could expire the
/// lease and the rescuer hand the run to another worker.
pub(crate) fn lease_guard(lease_ms: u64) -> Duration {
    Duration::from_millis((lease_ms / 10).max(50))
}

/// Wakes the claim loop on `runq_pending`, the sequencer on `runq_sequence`,
/// and cancels held runs named on `runq_cancel`. Reconnects on its own; notifications lost meanwhile are
/// covered by polling and the heartbeat.
pub(crate) async fn listen(
    pool: PgPool,
    leases: Leases,
    wake: Arc<Notify>,
    sequence_wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener
                .listen_all([PENDING_CHANNEL, CANCEL_CHANNEL, SEQUENCE_CHANNEL])
                .await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = stop.cancelled() => return,
            listener = listener => match listener {
                Ok(listener) => listener,
                Err(err) => {
                    failures += 1;
                    let delay = retry_delay(failures);
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64,
                        "listener could not connect");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        failures = 0;
        // Runs may have arrived while we were not listening.
        wake.notify_one();
        sequence_wake.notify_one();
        loop {
            let notification = tokio::select! {
                _ = stop.cancelled() => return,
                notification = listener.try_recv() => notification,
            };
            match notification {
                Ok(Some(notification)) if notification.channel() == CANCEL_CHANNEL => {
                    let signals = notification
                        .payload()
                        .parse()
                        .ok()
                        .and_then(|id| leases.signals_of(id));
                    if let Some(signals) = signals {
                        signals.cancel.cancel();
                    }
                }
                Ok(Some(notification)) if notification.channel() == SEQUENCE_CHANNEL => {
                    sequence_wake.notify_one();
                }
                Ok(Some(_)) => wake.notify_one(),
                // The connection dropped; try_recv reconnects on the next call.
                Ok(None) => wake.notify_one(),
                Err(err) => {
                    tracing::warn!(error = %err, "listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

/// Extends every held lease in one statement each `every`, renews the local
/// deadlines of the leases it extended, drops runs whose lease was taken
/// over, passes on cancel requests and keeps the worker's own row fresh.
pub(crate) async fn heartbeat(
    pool: PgPool,
    worker: WorkerId,
    leases: Leases,
    every: Duration,
    lease_ms: u64,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let held = leases.all();
        let beat = async {
            let mut conn = pool.acquire().await?;
            workers::heartbeat(&mut conn, worker).await?;
            if held.is_empty() {
                return Ok((Vec::new(), Instant::now()));
            }
            // Sent now: the database sets the new expiry no earlier.
            let sent = Instant::now();
            let alive = runs::extend_leases(&mut conn, &held, lease_ms as i64).await?;
            Ok::<_, DbError>((alive, sent))
        };
        match beat.await {
            Ok((alive, sent)) => {
                let alive: std::collections::HashMap<_, _> =
                    alive.into_iter().map(|run| (run.id, run)).collect();
                let mut extended = Vec::with_capacity(held.len());
                for lease in held {
                    match alive.get(&lease.id) {
                        None => {
                            if leases.signals(lease).is_some() {
                                tracing::warn!(run.id = %lease.id, "lease lost; dropping the run");
                                leases.lose(lease);
                            }
                        }
                        Some(run) => {
                            if run.extended {
                                extended.push(lease);
                            }
                            if run.cancel_requested {
                                if let Some(signals) = leases.signals(lease) {
                                    signals.cancel.cancel();
                                }
                            }
                        }
                    }
                }
                leases.renew(&extended, sent + Duration::from_millis(lease_ms));
            }
            Err(err) => tracing::warn!(error = %err, "heartbeat failed"),
        }
    }
}

/// The lease guard: drops every held run `margin` before its local lease
/// deadline, aborting the step in flight. While heartbeats succeed the
/// deadlines keep moving and it does nothing; when this worker loses Postgres
/// it stops acting on its runs before the rescuer could hand them to another
/// worker (DESIGN.md, invariant 1).
pub(crate) async fn guard_leases(leases: Leases, margin: Duration, stop: CancellationToken) {
    // New claims and renewals only move deadlines later, so sleeping until the
    // earliest one known misses nothing; the cap bounds the wait when no run
    // is held.
    const IDLE: Duration = Duration::from_millis(250);
    loop {
        let now = Instant::now();
        let wake_at = leases
            .earliest_deadline()
            .map(|deadline| deadline.checked_sub(margin).unwrap_or(now))
            .unwrap_or(now + IDLE)
            .min(now + IDLE);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(wake_at) => {}
        }
        let overdue = leases.expire_overdue(Instant::now() + margin);
        if !overdue.is_empty() {
            tracing::warn!(
                runs = overdue.len(),
                margin_ms = margin.as_millis() as u64,
                "leases may be about to expire (no heartbeat got through); aborting their runs"
            );
        }
    }
}
