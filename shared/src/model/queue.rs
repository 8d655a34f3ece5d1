//! What `GET /v1/queues` and `GET /v1/workers` show.

use chrono::{DateTime, Utc};
use poem_openapi::Object;
use serde::{Deserialize, Serialize};

use super::*;

/// One queue as a tenant sees it: its own runs there.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct QueueStats {
    /// The queue's name.
    pub name: String,
    /// Runs waiting (due or delayed).
    pub pending: i64,
    /// Runs executing now.
    pub running: i64,
    /// Runs that succeeded (until pruned).
    pub succeeded: i64,
    /// Runs that failed (until pruned).
    pub failed: i64,
    /// Runs stopped by a cap (until pruned).
    pub stopped_quota: i64,
    /// Runs cancelled (until pruned).
    pub cancelled: i64,
    /// How long the oldest due pending run has waited, in seconds (null when
    /// none is due).
    pub oldest_pending_seconds: Option<f64>,
    /// Runs claimed in the last minute.
    pub started_last_minute: i64,
    /// Runs that reached a final state in the last minute.
    pub finished_last_minute: i64,
    /// Whether the queue is paused (workers claim nothing from it).
    pub paused: bool,
    /// Most runs of the queue running at once across the fleet, if limited.
    pub concurrency_limit: Option<i32>,
    /// Most runs of the queue started per second across the fleet, if limited.
    pub rate_limit_per_second: Option<f64>,
}

/// A queue's settings, fleet-wide (`runq queue set`).
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct QueueSettings {
    /// The queue's name.
    pub name: String,
    /// Workers claim nothing from a paused queue; running runs finish.
    pub paused: bool,
    /// Most runs running at once across the fleet (null: no limit).
    pub concurrency: Option<i32>,
    /// Most runs started per second across the fleet (null: no limit).
    pub rate_per_second: Option<f64>,
}

/// The answer of `GET /v1/queues`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct QueueList {
    /// Every queue the tenant has runs in, by name.
    pub queues: Vec<QueueStats>,
}

/// A live worker process.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    /// Its id (`locked_by` of the runs it holds).
    pub id: WorkerId,
    /// The host it runs on.
    pub hostname: String,
    /// Its process id there.
    pub pid: i32,
    /// The queues it claims from.
    pub queues: Vec<String>,
    /// Runs it executes at once.
    pub concurrency: i32,
    /// Runs it holds now (executing or prefetched), of every tenant.
    pub in_flight: i64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub last_heartbeat_at: DateTime<Utc>,
}

/// The answer of `GET /v1/workers`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WorkerList {
    /// Workers that have not stopped and heartbeated recently, oldest first.
    pub workers: Vec<WorkerInfo>,
}
