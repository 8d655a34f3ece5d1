//! Fault tests: real `runq` processes killed, paused, cut off from Postgres,
//! and Postgres itself restarted. After each, DESIGN.md's invariants are
//! checked over every run (`check_invariants`). `just test-fast` skips these.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use runq_devtools::postgres::{Durability, LocalCluster};
use runq_shared::db::runs;
use runq_shared::{CreateRun, NewStep};
use serde_json::{json, Value};

use crate::support::process::{free_port, Proc};
use crate::support::target::Target;
use crate::support::{
    check_invariants, held_by, outbox_types, poll, token, wait_for, worker_id_of, TestDb,
};

mod clock;
mod long_steps;
mod postgres;
mod processes;

/// Short leases so a dead worker's runs come back within a second or two.
const FAST_LEASE: [(&str, &str); 2] = [("RUNQ_LEASE_MS", "1000"), ("RUNQ_HEARTBEAT_MS", "200")];

fn http_run(url: &str) -> CreateRun {
    CreateRun::new(vec![
        NewStep::new("call", "http", json!({ "url": url })),
        NewStep::new("after", "echo", json!({ "after": true })),
    ])
}

async fn row(db: &TestDb, id: uuid::Uuid) -> (String, i32, Option<Value>, Option<Value>) {
    sqlx::query_as("SELECT status::text, attempt, result, error FROM runs WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("run")
}

async fn wait_seen(target: &Target, id: uuid::Uuid, attempt: i32) {
    wait_for(
        &format!("the target to see attempt {attempt} of {id}"),
        Duration::from_secs(20),
        &mut || async { target.seen.saw(id, attempt) },
    )
    .await;
}

/// A cluster of this test's own (so it can be stopped), deleted afterwards.
struct OwnCluster {
    cluster: LocalCluster,
    dir: std::path::PathBuf,
}

impl OwnCluster {
    fn start() -> Self {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("runq-fault-pg-{}", uuid::Uuid::now_v7().simple()));
        let cluster = LocalCluster::start(&dir, Durability::Fast).unwrap_or_else(|err| {
            panic!("this test restarts Postgres and needs local binaries: {err}")
        });
        OwnCluster { cluster, dir }
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = self.cluster.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
