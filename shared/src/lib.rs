//! runq-shared: everything the API, the workers and library users agree on.
//!
//! - [`model`]: the payloads that cross a process boundary (API bodies, outbox
//!   events, the step envelope), each one serde type also described in OpenAPI.
//! - [`db`]: every SQL statement runq runs, one module per table family. Each
//!   function takes `&mut PgConnection` so the caller owns the transaction.
//! - [`protocol`]: what a worker claims and hands back (leases, outcomes).
//! - [`tenancy`]: the payloads of a tenant's settings (tokens, projects, the
//!   audit log).
//! - [`quotas`]: plans, per-tenant quotas and their API payloads.
//! - [`storable`]: whether a JSON value can be stored in `jsonb`.
//! - [`config`]: clap-derived settings shared by the `runq` subcommands.
#![warn(missing_docs)]

pub mod config;
pub mod db;
pub mod model;
pub mod protocol;
pub mod quotas;
pub mod signing;
pub mod storable;
pub mod tenancy;

pub use db::runs::{enqueue, enqueue_many};
pub use db::DbError;
pub use model::*;
pub use tenancy::*;
