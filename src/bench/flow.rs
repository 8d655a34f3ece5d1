//! Flow-control knobs of a bench run, so the cost of fairness and queue
//! limits can be measured (README, "Performance"): the drain's runs spread
//! over several tenants (every claim then shares its batch out between
//! them) and a fleet-wide concurrency limit on the bench queue (every claim
//! then takes the limited path: the settings row's lock, a count of running
//! runs, the claim, in one transaction).

use anyhow::Context;
use runq_shared::db::queues;
use runq_shared::TenantId;

use super::harness::Harness;
use super::QUEUE;

/// What to turn on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Tenants the drain's runs are spread over, round robin (1: the bench
    /// tenant alone).
    pub tenants: usize,
    /// The bench queue's concurrency limit, if any.
    pub queue_concurrency: Option<i32>,
}

/// Creates the extra tenants (unlimited, like the bench tenant) and sets
/// the bench queue's limit; returns the tenants, the bench tenant first.
///
/// # Errors
///
/// Database errors.
pub async fn apply(harness: &Harness, flow: Flow) -> anyhow::Result<Vec<TenantId>> {
    let mut conn = harness.pool.acquire().await.context("connecting")?;
    let mut tenants = vec![harness.tenant];
    for i in 2..=flow.tenants {
        tenants.push(super::harness::unlimited_tenant(&mut conn, &format!("bench-{i}")).await?);
    }
    queues::set(
        &mut conn,
        QUEUE,
        &queues::QueueChange {
            concurrency: Some(flow.queue_concurrency),
            ..queues::QueueChange::default()
        },
    )
    .await
    .context("setting the bench queue's limit")?;
    Ok(tenants)
}

/// Takes the bench queue's limit away again.
///
/// # Errors
///
/// Database errors.
pub async fn clear(harness: &Harness) -> anyhow::Result<()> {
    let mut conn = harness.pool.acquire().await.context("connecting")?;
    queues::set(
        &mut conn,
        QUEUE,
        &queues::QueueChange {
            concurrency: Some(None),
            ..queues::QueueChange::default()
        },
    )
    .await
    .context("clearing the bench queue's limit")?;
    Ok(())
}
