//! runq's Postgres-backed integration suite. Each test gets its own migrated
//! database (see `support`), so tests run in parallel without sharing state.

mod support;

mod api;
mod claim;
mod clients;
mod contract;
mod execution;
mod faults;
mod load;
mod shutdown;
