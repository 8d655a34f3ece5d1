//! runq's Postgres-backed integration suite. Each test gets its own migrated
//! database (see `support`), so tests run in parallel without sharing state.

mod support;

mod api;
mod claim;
mod cli;
mod clients;
mod contract;
mod dev;
mod events;
mod execution;
mod fairness;
mod faults;
mod flow;
mod hardening;
mod ingest;
mod isolation;
mod load;
mod outbound;
mod prefetch;
mod properties;
mod queues;
mod quotas;
mod retention;
mod schedules;
mod sequences;
mod shutdown;
mod streams;
mod tenancy;
mod webhooks;
