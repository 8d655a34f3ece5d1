//! Real `runq` processes for tests: the built binary, its signals, its exit.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// `RUNQ_OUTBOUND_ALLOW` of every process: loopback, so `http` steps reach
/// the servers a test runs on this host (a worker refuses them by default).
pub const LOOPBACK_ALLOW: &str = "127.0.0.0/8,::1/128";

/// A `runq` child process, killed when dropped.
pub struct Proc {
    pub child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `runq <args>` against `database_url` with `env` (which
    /// overrides the test settings), logging to a file.
    pub fn spawn(args: &[&str], database_url: &str, env: &[(&str, &str)]) -> Self {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "runq-{}-{}.log",
            args[0],
            uuid::Uuid::now_v7().simple()
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_runq"));
        command
            .args(args)
            .env("DATABASE_URL", database_url)
            .env("RUNQ_POLL_INTERVAL_MS", "50")
            .env("RUNQ_MAINTENANCE_MS", "100")
            .env("RUNQ_HEARTBEAT_MS", "200")
            .env("RUNQ_RETRY_BASE_MS", "10")
            .env("RUNQ_RETRY_MAX_MS", "50")
            .env("RUNQ_OUTBOUND_ALLOW", LOOPBACK_ALLOW)
            .env("RUST_LOG", "info,sqlx=warn")
            .stdout(Stdio::null())
            .stderr(file);
        for (key, value) in env {
            command.env(key, value);
        }
        Proc {
            child: command.spawn().expect("spawn runq"),
            log,
        }
    }

    /// Starts `runq worker` on `database_url`.
    pub fn worker(database_url: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn(&["worker"], database_url, env)
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signal the process");
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for it to exit, at most `limit`; panics (after SIGKILL) otherwise.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = &mut self.child;
        let exited = super::poll(limit, || {
            let status = child.try_wait().expect("try_wait");
            async move { status }
        })
        .await;
        match exited {
            Some(status) => status,
            None => {
                let _ = self.child.kill();
                panic!(
                    "runq did not exit within {limit:?}; log: {}",
                    self.log_text()
                );
            }
        }
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        if self.alive() {
            self.signal(Signal::SIGTERM);
        }
        self.wait_exit(Duration::from_secs(30)).await
    }

    /// What it logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}
