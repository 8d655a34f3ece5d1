//! The API process: `runq api` started from this executable on a free
//! loopback port, as users run it, so its memory and CPU are its own and
//! not the load generator's, and stopped with SIGTERM (see
//! [`super::process`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use runq_shared::config::DatabaseArgs;

use super::process::{self, ChildProcess};

/// Largest request body the API accepts (the `runq api` default).
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// How long the API gets to answer `GET /health` after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `runq api` child process.
pub struct ApiProcess {
    /// Where it listens.
    pub address: SocketAddr,
    process: ChildProcess,
}

impl ApiProcess {
    /// Starts `runq api` on `127.0.0.1:<free port>` against `database_url`
    /// with the pool settings of `database` and every API setting at the
    /// `runq api` default, and waits until it answers `GET /health`
    /// through `client`. Its output is discarded unless `logs`.
    ///
    /// # Errors
    ///
    /// No port is free, or the process cannot be started, exits, or does
    /// not answer within 30 s.
    pub async fn start(
        database_url: &str,
        database: &DatabaseArgs,
        logs: bool,
        client: &reqwest::Client,
    ) -> anyhow::Result<Self> {
        // The port is free when asked; another process could take it before
        // the API binds it, and then the API exits and the wait below says so.
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("finding a free loopback port for the API")?;
        let mut command = process::command("api", database_url, database, logs)?;
        command
            .env("RUNQ_LISTEN", address.to_string())
            .env("RUNQ_MAX_BODY_BYTES", MAX_BODY_BYTES.to_string())
            .env("MAX_EVENTS_PER_MINUTE", "300")
            .env("RUNQ_MAX_STREAMS", "1000")
            .env("RUNQ_MAX_STREAMS_PER_TENANT", "50")
            .env("RUNQ_STREAM_KEEP_ALIVE_SECONDS", "15")
            // No step kind beyond the built-in ones (`echo` is one).
            .env_remove("RUNQ_STEP_KINDS")
            // The bench applied migrations already.
            .env("RUNQ_NO_MIGRATE", "true");
        let mut api = Self {
            address,
            process: ChildProcess::spawn(command, "API")?,
        };
        api.answering(client).await?;
        Ok(api)
    }

    /// Waits until the API answers `GET /health`.
    async fn answering(&mut self, client: &reqwest::Client) -> anyhow::Result<()> {
        let url = format!("http://{}/health", self.address);
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let answer = client
                .get(&url)
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if answer.is_ok_and(|response| response.status().is_success()) {
                return Ok(());
            }
            self.process.check_alive()?;
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "API process {} did not answer GET {url} within {} s",
                    self.process.pid(),
                    READY_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The API process's peak resident set since it started (`VmHWM`), in
    /// bytes; `None` where `/proc` is not there.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        self.process.peak_rss_bytes()
    }

    /// Sends SIGTERM and waits for the API to finish its connections and
    /// exit.
    ///
    /// # Errors
    ///
    /// The API does not exit within 30 s, or exits unsuccessfully (it
    /// failed while serving).
    pub async fn stop(self) -> anyhow::Result<()> {
        let pid = self.process.pid();
        let status = self.process.stop().await?;
        if !status.success() {
            bail!("API process {pid} exited unsuccessfully after SIGTERM ({status}); rerun with --worker-logs to see why");
        }
        Ok(())
    }
}
