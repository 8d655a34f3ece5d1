//! Worker processes: `runq worker` started from this executable, as users run
//! it, and stopped with SIGTERM. A [`WorkerProcess`] that is dropped without
//! [`WorkerProcess::stop`] (an error, a panic) is killed, so no worker outlives
//! the benchmark.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use runq_devtools::bench_db;
use runq_shared::config::DatabaseArgs;
use sqlx::PgPool;

use super::QUEUE;

/// How long a stopped worker gets to exit: its shutdown grace (10 s by
/// default) plus the final flush, with room to spare.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a worker gets to register itself after it is started.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Variables set for the worker by the tool itself; any other `RUNQ_*` the
/// worker inherits changes its defaults and is reported in `settings`.
const SET_HERE: [&str; 5] = [
    "RUNQ_QUEUES",
    "RUNQ_CONCURRENCY",
    "RUNQ_DB_MAX_CONNECTIONS",
    "RUNQ_DB_ACQUIRE_TIMEOUT_MS",
    "RUNQ_NO_MIGRATE",
];

/// Whether the environment variable `name` reaches a worker and changes how
/// it behaves (the bench's own `RUNQ_BENCH_*` options do not).
pub fn inherits(name: &str) -> bool {
    name.starts_with("RUNQ_") && !name.starts_with("RUNQ_BENCH_") && !SET_HERE.contains(&name)
}

/// A running `runq worker` child process.
pub struct WorkerProcess {
    child: tokio::process::Child,
    pid: i32,
}

impl WorkerProcess {
    /// Starts `runq worker` on queue `bench` with `concurrency` slots against
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
        concurrency: usize,
        logs: bool,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the runq executable")?;
        let child = tokio::process::Command::new(&exe)
            .arg("worker")
            .env("DATABASE_URL", database_url)
            .env("RUNQ_QUEUES", QUEUE)
            .env("RUNQ_CONCURRENCY", concurrency.to_string())
            .env(
                "RUNQ_DB_MAX_CONNECTIONS",
                database.max_connections.to_string(),
            )
            .env(
                "RUNQ_DB_ACQUIRE_TIMEOUT_MS",
                database.acquire_timeout_ms.to_string(),
            )
            // The bench applied migrations already; a worker still checks them,
            // as in production, which is part of its start-up time.
            .env_remove("RUNQ_NO_MIGRATE")
            .envs(env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if logs {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} worker", exe.display()))?;
        let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
            bail!("the worker process exited as soon as it started");
        };
        Ok(Self { child, pid })
    }

    /// The exit status if the worker has exited.
    ///
    /// # Errors
    ///
    /// The status cannot be read.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking on worker process {}", self.pid))
    }

    /// The process's peak resident set so far (`VmHWM` in
    /// `/proc/<pid>/status`), in bytes; `None` where `/proc` is not there.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// Fails if the worker has exited: it should run until stopped.
    ///
    /// # Errors
    ///
    /// The worker exited, or its status cannot be read.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.exited()? {
            Some(status) => bail!(
                "worker process {} exited early ({status}); rerun with --worker-logs to see why",
                self.pid
            ),
            None => Ok(()),
        }
    }

    /// Waits until the worker has registered itself in the `workers` table:
    /// it has connected, migrated and is about to claim.
    ///
    /// # Errors
    ///
    /// The worker exits or does not register within 30 s.
    pub async fn registered(&mut self, pool: &PgPool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + REGISTER_TIMEOUT;
        let mut conn = pool.acquire().await.context("connecting")?;
        loop {
            if bench_db::workers_running_with_pid(&mut conn, self.pid)
                .await
                .context("looking for the worker's registration")?
            {
                return Ok(());
            }
            self.check_alive()?;
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "worker process {} did not register within {} s",
                    self.pid,
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
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if self.exited()?.is_none() {
            kill(Pid::from_raw(self.pid), Signal::SIGTERM)
                .with_context(|| format!("sending SIGTERM to worker process {}", self.pid))?;
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => {
                let status =
                    status.with_context(|| format!("waiting for worker process {}", self.pid))?;
                if !status.success() {
                    tracing::warn!(pid = self.pid, %status, "worker exited unsuccessfully after SIGTERM");
                }
                Ok(())
            }
            Err(_) => {
                // Dropping `self` kills it.
                bail!(
                    "worker process {} did not exit within {} s of SIGTERM",
                    self.pid,
                    STOP_TIMEOUT.as_secs()
                )
            }
        }
    }
}
