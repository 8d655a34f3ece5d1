//! Child processes of the benchmark: `runq worker` and `runq api` started
//! from this executable, as users run them, and stopped with SIGTERM. A
//! [`ChildProcess`] that is dropped without [`ChildProcess::stop`] (an error,
//! a panic) is killed, so no child outlives the benchmark.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use runq_shared::config::DatabaseArgs;

/// How long a stopped child gets to exit: a worker's shutdown grace (10 s by
/// default) plus the final flush, with room to spare.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Variables the tool sets on each child that reads them (the worker's
/// queues and slots, the API's listen address and limits, both pools);
/// any other `RUNQ_*` a child inherits changes its defaults and is reported
/// in `settings`.
const SET_HERE: [&str; 11] = [
    "RUNQ_QUEUES",
    "RUNQ_CONCURRENCY",
    "RUNQ_DB_MAX_CONNECTIONS",
    "RUNQ_DB_ACQUIRE_TIMEOUT_MS",
    "RUNQ_NO_MIGRATE",
    "RUNQ_LISTEN",
    "RUNQ_MAX_BODY_BYTES",
    "RUNQ_STEP_KINDS",
    "RUNQ_MAX_STREAMS",
    "RUNQ_MAX_STREAMS_PER_TENANT",
    "RUNQ_STREAM_KEEP_ALIVE_SECONDS",
];

/// Whether the environment variable `name` reaches a worker or the API and
/// changes how it behaves (the bench's own `RUNQ_BENCH_*` options do not).
pub fn inherits(name: &str) -> bool {
    name.starts_with("RUNQ_") && !name.starts_with("RUNQ_BENCH_") && !SET_HERE.contains(&name)
}

/// `runq <subcommand>` against `database_url` with the pool settings of
/// `database`, ready for the caller's own variables. Its output is
/// discarded unless `logs`, when its stderr is this process's.
///
/// # Errors
///
/// This executable cannot be found.
pub fn command(
    subcommand: &str,
    database_url: &str,
    database: &DatabaseArgs,
    logs: bool,
) -> anyhow::Result<tokio::process::Command> {
    let exe = std::env::current_exe().context("finding the runq executable")?;
    let mut command = tokio::process::Command::new(exe);
    command
        .arg(subcommand)
        .env("DATABASE_URL", database_url)
        .env(
            "RUNQ_DB_MAX_CONNECTIONS",
            database.max_connections.to_string(),
        )
        .env(
            "RUNQ_DB_ACQUIRE_TIMEOUT_MS",
            database.acquire_timeout_ms.to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if logs {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true);
    Ok(command)
}

/// A running child process; `what` names it in errors (`worker`, `API`).
pub struct ChildProcess {
    child: tokio::process::Child,
    pid: i32,
    what: &'static str,
}

impl ChildProcess {
    /// Starts `command` (from [`command`]).
    ///
    /// # Errors
    ///
    /// The process cannot be started, or exits at once.
    pub fn spawn(mut command: tokio::process::Command, what: &'static str) -> anyhow::Result<Self> {
        let child = command
            .spawn()
            .with_context(|| format!("starting the {what} process"))?;
        let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
            bail!("the {what} process exited as soon as it started");
        };
        Ok(Self { child, pid, what })
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The exit status if the process has exited.
    ///
    /// # Errors
    ///
    /// The status cannot be read.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking on {} process {}", self.what, self.pid))
    }

    /// Fails if the process has exited: it should run until stopped.
    ///
    /// # Errors
    ///
    /// The process exited, or its status cannot be read.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.exited()? {
            Some(status) => bail!(
                "{} process {} exited early ({status}); rerun with --worker-logs to see why",
                self.what,
                self.pid
            ),
            None => Ok(()),
        }
    }

    /// The process's peak resident set since it started, in bytes; see
    /// [`peak_rss_bytes`].
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        peak_rss_bytes(self.pid)
    }

    /// Sends SIGTERM and waits for the process to exit; returns how it
    /// exited. A process that does not exit within 30 s is killed and
    /// reported.
    ///
    /// # Errors
    ///
    /// The signal cannot be sent, or the process does not exit in time.
    pub async fn stop(mut self) -> anyhow::Result<ExitStatus> {
        let (what, pid) = (self.what, self.pid);
        if self.exited()?.is_none() {
            kill(Pid::from_raw(pid), Signal::SIGTERM)
                .with_context(|| format!("sending SIGTERM to {what} process {pid}"))?;
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.with_context(|| format!("waiting for {what} process {pid}")),
            // Dropping `self` kills it.
            Err(_) => bail!(
                "{what} process {pid} did not exit within {} s of SIGTERM",
                STOP_TIMEOUT.as_secs()
            ),
        }
    }
}

/// The peak resident set of process `pid` since it started (`VmHWM` in
/// `/proc/<pid>/status`), in bytes; `None` where `/proc` is not there.
pub fn peak_rss_bytes(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    vm_hwm_bytes(&status)
}

/// `VmHWM` of a `/proc/<pid>/status` text, in bytes.
fn vm_hwm_bytes(status: &str) -> Option<u64> {
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

/// `bytes` in MB (MiB), to one decimal, as the report prints memory.
pub fn megabytes(bytes: u64) -> f64 {
    (bytes as f64 / 1_048_576.0 * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_is_read_from_vm_hwm_in_kib() {
        let status =
            "Name:\trunq\nVmPeak:\t  900000 kB\nVmHWM:\t   17716 kB\nVmRSS:\t   12000 kB\n";
        assert_eq!(vm_hwm_bytes(status), Some(17_716 * 1024));
        assert_eq!(megabytes(17_716 * 1024), 17.3);
        assert_eq!(vm_hwm_bytes("Name:\trunq\n"), None);
    }

    #[test]
    fn variables_the_tool_sets_are_not_reported_as_inherited() {
        assert!(inherits("RUNQ_PREFETCH"));
        assert!(inherits("RUNQ_DEFAULT_PLAN"));
        assert!(!inherits("RUNQ_BENCH_N"));
        assert!(!inherits("RUNQ_QUEUES"));
        assert!(!inherits("RUNQ_LISTEN"));
        assert!(!inherits("DATABASE_URL"));
    }
}
