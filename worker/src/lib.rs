//! runq-worker: claims runs from Postgres and executes their pipelines.
//!
//! - [`Worker`]: the claim loop (batched claims with a bounded prefetch,
//!   `LISTEN`/`NOTIFY` wake-ups with polling as a fallback), executors in a
//!   `JoinSet`, batched heartbeats, the lease guard, and graceful shutdown.
//! - [`handler`]: the [`Handler`] trait for custom step kinds and the built-in
//!   `http`, `sleep`, `echo` and `fail`.
//! - completer: writes checkpoints and outcomes in fenced batches, isolating
//!   a write the database refuses.
//! - [`maintenance`]: the lease rescuer, run by every worker.
//! - [`relay`]: the outbox relay and webhook sender, run by every worker.
//! - [`outbound`]: which addresses outbound requests may reach (the SSRF
//!   guard) and the HTTP client that enforces it.
#![warn(missing_docs)]

mod claim_loop;
mod completer;
mod executor;
pub mod handler;
mod leases;
pub mod maintenance;
pub mod outbound;
mod prefetch;
pub mod relay;
mod services;
mod worker;

pub use handler::{Events, Handler, Handlers, StepError};
pub use worker::{Worker, WorkerError, WorkerReport};
