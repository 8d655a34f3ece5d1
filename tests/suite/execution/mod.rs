//! Executing pipelines: data flow between steps, checkpoints, failures,
//! retries, fencing and the outbox rows of every state change.

use std::time::Duration;

use runq_shared::db::outbox;
use runq_shared::db::runs;
use runq_shared::protocol::{Backoff, Checkpoint, CheckpointResult, Completion, Outcome};
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
