//! Executing pipelines: data flow between steps, checkpoints, failures,
//! retries, fencing and the outbox rows of every state change.

use std::time::Duration;

use runq_shared::db::outbox;
use runq_shared::db::runs::{self, RescueReport};
use runq_shared::protocol::{
    Backoff, Checkpoint, CheckpointResult, ClaimedRun, Completion, Outcome,
};
use runq_shared::{CreateRun, EventType, NewStep, RunStatus};
use runq_worker::maintenance::Rescuer;
use runq_worker::Worker;
use serde_json::{json, Value};

use crate::support::handlers::{Count, Executions, FailOnce};
use crate::support::{check_invariants, echo_run, worker_config, RunningWorker, TestDb};

mod claiming;
mod enqueue;
mod fencing;
mod pipelines;

/// Retry at once: these tests drive the rescuer and retries by hand.
const NO_BACKOFF: Backoff = Backoff {
    base_ms: 0.0,
    max_ms: 0.0,
};

/// Claims one run of the default queue for `worker` (a 30 s lease) straight
/// through the SQL layer, as a worker's claim loop would.
async fn claim_one(conn: &mut sqlx::PgConnection, worker: uuid::Uuid) -> ClaimedRun {
    runs::claim(conn, worker, &["default".to_owned()], 1, 30_000)
        .await
        .expect("claim")
        .remove(0)
}

/// The holder stalls past its lease: every lease is expired and the rescuer
/// runs once (no backoff), retrying or failing what it finds.
async fn expire_leases_and_rescue(db: &TestDb) -> RescueReport {
    db.execute("UPDATE runs SET lease_expires_at = now() - interval '1 second'")
        .await;
    Rescuer::new(db.pool.clone(), NO_BACKOFF, 60_000)
        .run_once()
        .await
        .expect("rescue")
}

async fn detail(db: &TestDb, id: uuid::Uuid) -> (runq_shared::Run, Vec<runq_shared::Step>) {
    let mut conn = db.pool.acquire().await.expect("connection");
    let run = runs::get(&mut conn, run_tenant(db, id).await, id)
        .await
        .expect("run");
    let steps = runq_shared::db::steps::list(&mut conn, run.tenant_id, id)
        .await
        .expect("steps");
    (run, steps)
}

async fn run_tenant(db: &TestDb, id: uuid::Uuid) -> uuid::Uuid {
    sqlx::query_scalar("SELECT tenant_id FROM runs WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("tenant")
}

async fn event_types(db: &TestDb, id: uuid::Uuid) -> Vec<EventType> {
    let mut conn = db.pool.acquire().await.expect("connection");
    outbox::for_run(&mut conn, id)
        .await
        .expect("outbox rows deserialise into OutboxEvent")
        .into_iter()
        .map(|row| row.payload.event_type)
        .collect()
}
