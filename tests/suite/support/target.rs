//! An HTTP target for `http` steps: records every request (run id, attempt,
//! position, arrival) and how it ended (answered, or abandoned by the caller),
//! and answers after a delay, so tests can observe executions made by real
//! worker processes, which share no memory with the test.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use poem::http::StatusCode;
use poem::web::{Data, Json, Query};
use poem::{handler, post, EndpointExt, Response, Route, Server};
use runq_shared::StepInput;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One request the target received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The run.
    pub id: Uuid,
    /// The run's attempt that sent it.
    pub attempt: i32,
    /// The step that sent it.
    pub position: i32,
    /// When it arrived.
    pub arrived: Instant,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The request.
    pub request: Request,
    /// When the target answered it, or noticed the caller had gone.
    pub at: Instant,
    /// `true`: answered; `false`: the caller hung up first (the server
    /// dropped the handler when the connection closed).
    pub answered: bool,
}

#[derive(Default)]
struct Log {
    requests: Vec<Request>,
    ended: Vec<Ended>,
}

/// Requests seen, in arrival order, and how they ended.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<Log>>);

impl Seen {
    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.0.lock().expect("not poisoned")
    }

    /// Every (run id, attempt) received.
    pub fn all(&self) -> Vec<(Uuid, i32)> {
        self.log()
            .requests
            .iter()
            .map(|r| (r.id, r.attempt))
            .collect()
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.log().requests.clone()
    }

    /// Every request that ended, in the order they ended.
    pub fn ended(&self) -> Vec<Ended> {
        self.log().ended.clone()
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

    /// Whether step `position` of run `id` was requested on `attempt`.
    pub fn saw_step(&self, id: Uuid, attempt: i32, position: i32) -> bool {
        self.log()
            .requests
            .iter()
            .any(|r| (r.id, r.attempt, r.position) == (id, attempt, position))
    }

    /// Whether the target answered run `id`'s request of `attempt` (its reply
    /// is on the wire, whether or not the caller reads it).
    pub fn answered(&self, id: Uuid, attempt: i32) -> bool {
        self.log()
            .ended
            .iter()
            .any(|e| e.answered && (e.request.id, e.request.attempt) == (id, attempt))
    }

    /// How the request of step `position` of run `id` on `attempt` ended, if it did.
    pub fn end_of(&self, id: Uuid, attempt: i32, position: i32) -> Option<Ended> {
        self.log()
            .ended
            .iter()
            .find(|e| {
                (e.request.id, e.request.attempt, e.request.position) == (id, attempt, position)
            })
            .copied()
    }
}

/// Records how a request ended when dropped: answered if `answer` was
/// called, else abandoned (poem drops the handler when the caller hangs up).
struct EndGuard {
    seen: Seen,
    request: Request,
    answered: bool,
}

impl EndGuard {
    fn answer(mut self) {
        self.answered = true;
    }
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        let ended = Ended {
            request: self.request,
            at: Instant::now(),
            answered: self.answered,
        };
        if let Ok(mut log) = self.seen.0.lock() {
            log.ended.push(ended);
        }
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

fn arrive(seen: &Seen, step: &StepInput) -> EndGuard {
    let request = Request {
        id: step.id,
        attempt: step.attempt,
        position: step.position,
        arrived: Instant::now(),
    };
    seen.log().requests.push(request);
    EndGuard {
        seen: seen.clone(),
        request,
        answered: false,
    }
}

/// How often a delayed answer writes a byte of whitespace while it waits.
const TRICKLE: Duration = Duration::from_millis(20);

#[handler]
async fn hook(
    Json(step): Json<StepInput>,
    Query(delay): Query<Delay>,
    Data(seen): Data<&Seen>,
) -> Response {
    let guard = arrive(seen, &step);
    let answer = json!({ "attempt": step.attempt, "position": step.position }).to_string();
    let wait = if delay
        .only_attempt
        .is_none_or(|attempt| attempt == step.attempt)
    {
        delay.delay_ms
    } else {
        0
    };
    if wait == 0 {
        guard.answer();
        return Response::builder()
            .content_type("application/json")
            .body(answer);
    }
    // The status goes out at once and the body trickles whitespace (valid
    // before a JSON value) until the answer is due: the server cannot notice
    // a caller that hung up until it writes, so writing is how an abandoned
    // request is seen within moments. A failed write drops this stream, and
    // the guard in it records the request as abandoned.
    let until = tokio::time::Instant::now() + Duration::from_millis(wait);
    let body = futures::stream::unfold(Some(guard), move |guard| {
        let answer = answer.clone();
        async move {
            let guard = guard?;
            let now = tokio::time::Instant::now();
            if now >= until {
                guard.answer();
                return Some((Ok::<_, std::io::Error>(answer.into_bytes()), None));
            }
            tokio::time::sleep_until(until.min(now + TRICKLE)).await;
            Some((Ok(b" ".to_vec()), Some(guard)))
        }
    });
    Response::builder()
        .content_type("application/json")
        .body(poem::Body::from_bytes_stream(body))
}

/// Valid JSON that Postgres cannot store in `jsonb`: a string holding U+0000.
pub const UNSTORABLE_BODY: &str = r#"{"bad":"\u0000"}"#;

#[handler]
async fn unstorable(Json(step): Json<StepInput>, Data(seen): Data<&Seen>) -> Response {
    arrive(seen, &step).answer();
    Response::builder()
        .status(StatusCode::OK)
        .content_type("application/json")
        .body(UNSTORABLE_BODY)
}

#[derive(Deserialize)]
struct Big {
    /// Bytes of the JSON string the reply carries.
    bytes: usize,
    /// Stream it without a `Content-Length`, so only reading reveals its size.
    #[serde(default)]
    chunked: bool,
}

/// Answers 200 with a JSON string of `bytes` bytes.
#[handler]
async fn big(
    Json(step): Json<StepInput>,
    Query(big): Query<Big>,
    Data(seen): Data<&Seen>,
) -> Response {
    arrive(seen, &step).answer();
    let body = format!("\"{}\"", "x".repeat(big.bytes));
    let response = Response::builder()
        .status(StatusCode::OK)
        .content_type("application/json");
    if big.chunked {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
            .into_bytes()
            .chunks(16 * 1024)
            .map(|chunk| Ok(chunk.to_vec()))
            .collect();
        response.body(poem::Body::from_bytes_stream(futures::stream::iter(chunks)))
    } else {
        response.body(body)
    }
}

/// The target server, stopped when dropped.
pub struct Target {
    /// `http://127.0.0.1:<port>/hook`.
    pub url: String,
    /// `http://127.0.0.1:<port>/unstorable`: answers 200 with
    /// [`UNSTORABLE_BODY`].
    pub unstorable_url: String,
    /// `http://127.0.0.1:<port>/big`: answers with a JSON string of
    /// `?bytes=` bytes (`&chunked=true`: without a `Content-Length`).
    pub big_url: String,
    /// What it received.
    pub seen: Seen,
    stop: CancellationToken,
}

impl Target {
    /// Serves the target on a free loopback port.
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let address = listener.local_addr().expect("address");
        let url = format!("http://{address}/hook");
        let unstorable_url = format!("http://{address}/unstorable");
        let big_url = format!("http://{address}/big");
        let seen = Seen::default();
        let stop = CancellationToken::new();
        let app = Route::new()
            .at("/hook", post(hook))
            .at("/unstorable", post(unstorable))
            .at("/big", post(big))
            .data(seen.clone());
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).expect("acceptor");
            Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(app, shutdown, Some(Duration::from_millis(10)))
                .await
        });
        Target {
            big_url,
            url,
            unstorable_url,
            seen,
            stop,
        }
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
