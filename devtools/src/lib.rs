//! runq-devtools: what developing and measuring runq needs and running it in
//! production does not. The API and worker crates never link it.
//!
//! - [`postgres`]: finding a Postgres server without configuration, and the
//!   throwaway cluster `runq dev` and the test harness start from local
//!   binaries.
//! - [`bench_db`]: the statements of the load tool (`runq bench`), which
//!   truncate tables and read timings no production path needs.
//! - [`soak_db`]: the soak phase's look at table, index and dead-row sizes.
#![warn(missing_docs)]

pub mod bench_db;
pub mod postgres;
pub mod soak_db;
