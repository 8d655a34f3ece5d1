//! An HTTP target for `http` steps: records every request (run id, attempt)
//! and answers after a delay, so tests can observe executions made by real
//! worker processes, which share no memory with the test.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use poem::web::{Data, Json, Query};
use poem::{handler, post, EndpointExt, Route, Server};
use runq_shared::StepInput;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Requests seen, in arrival order.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<(Uuid, i32)>>>);

impl Seen {
    /// Every (run id, attempt) received.
    pub fn all(&self) -> Vec<(Uuid, i32)> {
        self.0.lock().expect("not poisoned").clone()
    }

    /// Requests per run.
    pub fn per_run(&self) -> HashMap<Uuid, usize> {
        let mut counts = HashMap::new();
        for (id, _) in self.all() {
            *counts.entry(id).or_default() += 1;
        }
        counts
    }

    /// Whether run `id` was requested on `attempt`.
    pub fn saw(&self, id: Uuid, attempt: i32) -> bool {
        self.all().contains(&(id, attempt))
    }
}

#[derive(Deserialize)]
struct Delay {
    /// Milliseconds to wait before answering.
    #[serde(default)]
    delay_ms: u64,
    /// Only delay requests of this attempt (others answer at once).
    only_attempt: Option<i32>,
}

#[handler]
async fn hook(
    Json(step): Json<StepInput>,
    Query(delay): Query<Delay>,
    Data(seen): Data<&Seen>,
) -> Json<Value> {
    seen.0
        .lock()
        .expect("not poisoned")
        .push((step.id, step.attempt));
    if delay
        .only_attempt
        .is_none_or(|attempt| attempt == step.attempt)
    {
        tokio::time::sleep(Duration::from_millis(delay.delay_ms)).await;
    }
    Json(json!({ "attempt": step.attempt, "position": step.position }))
}

/// The target server, stopped when dropped.
pub struct Target {
    /// `http://127.0.0.1:<port>/hook`.
    pub url: String,
    /// What it received.
    pub seen: Seen,
    stop: CancellationToken,
}

impl Target {
    /// Serves the target on a free loopback port.
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}/hook", listener.local_addr().expect("address"));
        let seen = Seen::default();
        let stop = CancellationToken::new();
        let app = Route::new().at("/hook", post(hook)).data(seen.clone());
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).expect("acceptor");
            Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(app, shutdown, Some(Duration::from_millis(10)))
                .await
        });
        Target { url, seen, stop }
    }

    /// The URL of a step that waits `delay_ms` (only on `only_attempt`, if given).
    pub fn url_with_delay(&self, delay_ms: u64, only_attempt: Option<i32>) -> String {
        match only_attempt {
            Some(attempt) => format!("{}?delay_ms={delay_ms}&only_attempt={attempt}", self.url),
            None => format!("{}?delay_ms={delay_ms}", self.url),
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
