//! Mapping this process's monotonic clock onto the database's clock, so an
//! instant taken here can be compared with a timestamp the database wrote.

use std::time::Instant;

use anyhow::Context;
use chrono::{DateTime, Utc};
use runq_devtools::bench_db;
use sqlx::PgPool;

/// Readings taken; the one with the shortest round trip is kept.
const SAMPLES: usize = 5;

/// One reading of the database clock paired with the local instant it
/// corresponds to.
#[derive(Debug, Clone, Copy)]
pub struct DbClock {
    local: Instant,
    db_micros: i64,
}

impl DbClock {
    /// Reads the database clock. The database read its clock somewhere between
    /// sending and receiving; taking the midpoint of the shortest of a few
    /// round trips bounds the error by half that round trip (well under a
    /// millisecond on loopback).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn read(pool: &PgPool) -> anyhow::Result<Self> {
        let mut conn = pool.acquire().await.context("connecting")?;
        // The first query on a connection may pay for statement preparation.
        bench_db::clock(&mut conn)
            .await
            .context("reading the database clock")?;
        let mut best: Option<(std::time::Duration, DbClock)> = None;
        for _ in 0..SAMPLES {
            let before = Instant::now();
            let db_now = bench_db::clock(&mut conn)
                .await
                .context("reading the database clock")?;
            let round_trip = before.elapsed();
            let reading = DbClock {
                local: before + round_trip / 2,
                db_micros: db_now.timestamp_micros(),
            };
            if best.is_none_or(|(shortest, _)| round_trip < shortest) {
                best = Some((round_trip, reading));
            }
        }
        best.map(|(_, reading)| reading)
            .context("no reading of the database clock")
    }

    /// Milliseconds from the local instant `local` to the database timestamp
    /// `db_time`; negative if `db_time` is earlier.
    pub fn ms_from(&self, local: Instant, db_time: DateTime<Utc>) -> f64 {
        let local_micros = if local >= self.local {
            self.db_micros + micros(local.duration_since(self.local))
        } else {
            self.db_micros - micros(self.local.duration_since(local))
        };
        (db_time.timestamp_micros() - local_micros) as f64 / 1_000.0
    }
}

fn micros(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
