//! Worker processes: `runq worker` started from this executable, as users run
//! it, and stopped with SIGTERM (see [`super::process`]).

use std::time::Duration;

use anyhow::{bail, Context};
use runq_devtools::bench_db;
use runq_shared::config::DatabaseArgs;
use sqlx::PgPool;

use super::process::{self, ChildProcess};

/// How long a worker gets to register itself after it is started.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `runq worker` child process.
pub struct WorkerProcess {
    process: ChildProcess,
}

impl WorkerProcess {
    /// Starts `runq worker` on `queues` with `concurrency` slots against
    /// `database_url`, with the pool settings of `database` and the extra
    /// variables `env`. Its output is discarded unless `logs`, when its
    /// stderr is this process's.
    ///
    /// # Errors
    ///
    /// This executable cannot be found or started.
    pub fn spawn(
        database_url: &str,
        database: &DatabaseArgs,
        queues: &[&str],
        concurrency: usize,
        logs: bool,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let mut command = process::command("worker", database_url, database, logs)?;
        command
            .env("RUNQ_QUEUES", queues.join(","))
            .env("RUNQ_CONCURRENCY", concurrency.to_string())
            // The bench applied migrations already; a worker still checks them,
            // as in production, which is part of its start-up time.
            .env_remove("RUNQ_NO_MIGRATE")
            .envs(env.iter().map(|(name, value)| (name, value)));
        Ok(Self {
            process: ChildProcess::spawn(command, "worker")?,
        })
    }

    /// The process's peak resident set since it started, in bytes; `None`
    /// where `/proc` is not there.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        self.process.peak_rss_bytes()
    }

    /// Fails if the worker has exited: it should run until stopped.
    ///
    /// # Errors
    ///
    /// The worker exited, or its status cannot be read.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.process.check_alive()
    }

    /// Waits until the worker has registered itself in the `workers` table:
    /// it has connected, migrated and is about to claim.
    ///
    /// # Errors
    ///
    /// The worker exits or does not register within 30 s.
    pub async fn registered(&mut self, pool: &PgPool) -> anyhow::Result<()> {
        let pid = self.process.pid();
        let deadline = tokio::time::Instant::now() + REGISTER_TIMEOUT;
        let mut conn = pool.acquire().await.context("connecting")?;
        loop {
            if bench_db::workers_running_with_pid(&mut conn, pid)
                .await
                .context("looking for the worker's registration")?
            {
                return Ok(());
            }
            self.check_alive()?;
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "worker process {pid} did not register within {} s",
                    REGISTER_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends SIGTERM and waits for the worker to exit. A worker that does not
    /// exit within 30 s is killed and reported.
    ///
    /// # Errors
    ///
    /// The signal cannot be sent, or the worker does not exit in time.
    pub async fn stop(self) -> anyhow::Result<()> {
        let pid = self.process.pid();
        let status = self.process.stop().await?;
        if !status.success() {
            tracing::warn!(pid, %status, "worker exited unsuccessfully after SIGTERM");
        }
        Ok(())
    }
}
