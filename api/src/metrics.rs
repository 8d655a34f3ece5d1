//! `GET /metrics`: the cluster's health in the Prometheus text format,
//! encoded by `prometheus-client`. Read at scrape time from Postgres's
//! statistics views and the worker registry
//! ([`runq_shared::db::workers::cluster_gauges`]), so every API process
//! reports the same figures and none keeps state.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use runq_shared::db::workers::ClusterGauges;
use std::sync::atomic::AtomicU64;

/// The exposition of `gauges`.
///
/// # Errors
///
/// Formatting into the string failed (it cannot, short of memory).
pub fn render(gauges: &ClusterGauges) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("runq");
    let oldest = Gauge::<f64, AtomicU64>::default();
    oldest.set(gauges.oldest_transaction_seconds);
    registry.register(
        "oldest_transaction_age_seconds",
        "Age of the oldest open transaction holding back vacuum, the outbox relay and the \
         event streams (0 when none)",
        oldest,
    );
    let counts = [
        (
            "runs_dead_tuples",
            "Dead row versions in the runs table waiting for vacuum",
            gauges.runs_dead_tuples,
        ),
        (
            "runs_live_tuples",
            "Rows in the runs table, as Postgres's statistics estimate them",
            gauges.runs_live_tuples,
        ),
        (
            "live_workers",
            "Worker processes that heartbeat within the last minute",
            gauges.live_workers,
        ),
    ];
    for (name, help, value) in counts {
        let gauge = Gauge::<i64>::default();
        gauge.set(value);
        registry.register(name, help, gauge);
    }
    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}
