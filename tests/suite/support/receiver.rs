//! A webhook receiver in Python (`tests/webhooks/receiver.py`) that verifies
//! each delivery with the Standard Webhooks reference library, not with
//! runq's signing code. Killed when dropped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde::Deserialize;
use serde_json::{json, Value};

/// One request the receiver got on a receiving path.
#[derive(Debug, Clone, Deserialize)]
pub struct Received {
    pub path: String,
    pub webhook_id: Option<String>,
    pub webhook_timestamp: Option<String>,
    pub webhook_signature: Option<String>,
    pub body: String,
    /// Whether `standardwebhooks` accepted the signature.
    pub verified: bool,
    /// The library's reason when it did not.
    pub error: Option<String>,
    /// What the receiver answered (`None`: it hung).
    pub status: Option<u16>,
    /// When it arrived (receiver clock, seconds).
    pub at: f64,
}

/// The receiver process.
pub struct Receiver {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    client: reqwest::Client,
}

impl Receiver {
    /// Starts the receiver, or `None` (after [`super::skip_or_fail`]) where
    /// python3 or `standardwebhooks` is missing.
    pub fn start() -> Option<Self> {
        let probe = Command::new("python3")
            .args(["-c", "import standardwebhooks"])
            .status();
        if !probe.is_ok_and(|status| status.success()) {
            super::skip_or_fail(
                "python3 with standardwebhooks is needed (pip install standardwebhooks==1.0.0)",
            );
            return None;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/webhooks/receiver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the receiver");
        let stdout = child.stdout.take().expect("receiver stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("receiver port");
        let port: u16 = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("receiver said {line:?}"));
        Some(Receiver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        })
    }

    /// The URL of receiving path `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sets up `path` to verify with `secret` and answer as `mode` says
    /// (`ok` after `fail_first` failures, `fail`, `hang`, `big`, `redirect`
    /// to `location`), after `delay_ms`.
    pub async fn route(&self, path: &str, secret: &str, mode: &str, options: Value) {
        let mut config = json!({ "path": path, "secret": secret, "mode": mode });
        if let (Some(config), Some(options)) = (config.as_object_mut(), options.as_object()) {
            config.extend(options.clone());
        }
        let reply = self
            .client
            .post(self.url("/_config"))
            .json(&config)
            .send()
            .await
            .expect("configure the receiver");
        assert!(reply.status().is_success());
    }

    /// Everything received so far, in arrival order.
    pub async fn log(&self) -> Vec<Received> {
        self.client
            .get(self.url("/_log"))
            .send()
            .await
            .expect("receiver log")
            .json()
            .await
            .expect("receiver log parses")
    }

    /// What arrived on `path`.
    pub async fn log_of(&self, path: &str) -> Vec<Received> {
        self.log()
            .await
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
