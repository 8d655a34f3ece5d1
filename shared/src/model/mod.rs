//! The payloads that cross a process boundary: API bodies, outbox events and the
//! step envelope. Each is one type, serialised by serde and described in the
//! OpenAPI spec by poem-openapi; the contract tests check that both agree.
//!
//! By concern, each re-exported here: the status enums that mirror Postgres
//! (`status.rs`), what clients submit (`submit.rs`), what they read back
//! (`run.rs`), events, outbox events and the step envelope (`event.rs`),
//! sidecar ingest (`ingest.rs`), webhook subscriptions (`webhook.rs`) and
//! what the live event streams send (`stream.rs`).

use poem_openapi::Object;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A run's id: a UUIDv7, so ids sort by creation time.
pub type RunId = Uuid;
/// A tenant's id.
pub type TenantId = Uuid;
/// A worker process's id, written into `runs.locked_by` while it holds a lease.
pub type WorkerId = Uuid;

/// Most steps a run may have.
pub const MAX_STEPS: usize = 64;
/// Most runs one batch request or one `enqueue_many` call may insert.
pub const MAX_BATCH: usize = 1_000;
/// Longest queue name, in characters.
pub const MAX_QUEUE_LEN: usize = 64;
/// Longest step name, step kind and idempotency key, in characters.
pub const MAX_NAME_LEN: usize = 255;
/// Longest sequence key, in characters.
pub const MAX_SEQUENCE_KEY_LEN: usize = 255;
/// Most attempts a run may be given.
pub const MAX_ATTEMPTS: i32 = 100;
/// Most bytes a run's `metadata` may take as compact JSON: it is copied into
/// every step's envelope.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;
/// The step kinds every worker can execute.
pub const BUILTIN_STEP_KINDS: [&str; 4] = ["http", "sleep", "echo", "fail"];

/// An RFC 9457 problem: the body of every error the API returns, served as
/// `application/problem+json`.
#[derive(Object, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Problem {
    /// Identifies the kind of problem (`urn:runq:problem:<slug>`).
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub problem_type: String,
    /// Short summary of the kind of problem.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request, and what to fix.
    pub detail: String,
}

mod event;
mod ingest;
mod queue;
mod run;
mod schedule;
mod status;
mod stream;
mod submit;
mod webhook;

pub use event::*;
pub use ingest::*;
pub use queue::*;
pub use run::*;
pub use schedule::*;
pub use status::*;
pub use stream::*;
pub use submit::*;
pub use webhook::*;
