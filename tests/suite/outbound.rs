//! The outbound guard against server-side request forgery, with real
//! workers and real Postgres: an `http` step aimed at a loopback, private or
//! link-local (cloud metadata) address, directly, through a hostname or
//! through a redirect, fails with reason `outbound_refused` before anything
//! is sent, unless the worker's allow-list (`RUNQ_OUTBOUND_ALLOW`) holds the
//! address. No test here needs a network: every refusal happens before a
//! connection is attempted (10.0.0.1 would otherwise hang or fail slowly).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use poem::http::StatusCode;
use poem::web::{Data, Query};
use poem::{handler, EndpointExt, Response, Route, Server};
use runq_shared::config::{parse_networks, WorkerConfig};
use runq_shared::{CreateRun, NewStep};
use runq_worker::Worker;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::process::Proc;
use crate::support::target::Target;
use crate::support::{worker_config, RunningWorker, TestDb};

/// A one-step `http` run to `url`, with one attempt so a refusal is final.
/// The step's own timeout is short: a guard that let a request through to
/// an unroutable address shows as a timeout (`step_failed`), not a hang.
fn http_run(url: &str) -> CreateRun {
    let mut run = CreateRun::new(vec![NewStep::new(
        "call",
        "http",
        json!({ "url": url, "timeout_ms": 5_000 }),
    )]);
    run.max_attempts = 1;
    run
}

/// Worker settings with exactly `allow` as the outbound allow-list.
fn allowing(allow: &[&str]) -> WorkerConfig {
    WorkerConfig {
        outbound_allow: parse_networks(&allow.join(",")).expect("test networks parse"),
        ..worker_config(4)
    }
}

/// Run `id`'s status and error (`null` when it has none).
async fn outcome(db: &TestDb, id: Uuid) -> (String, Value) {
    sqlx::query_as("SELECT status::text, coalesce(error, 'null'::jsonb) FROM runs WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("run")
}

/// Asserts run `id` failed with reason `outbound_refused` and a message
/// holding every one of `names`.
async fn assert_refused(db: &TestDb, id: Uuid, names: &[&str]) {
    let (status, error) = outcome(db, id).await;
    assert_eq!(status, "failed", "{error}");
    assert_eq!(error["reason"], "outbound_refused", "{error}");
    let message = error["message"].as_str().unwrap_or_default();
    for name in names {
        assert!(message.contains(name), "{name:?} not in {message:?}");
    }
    assert!(message.contains("RUNQ_OUTBOUND_ALLOW"), "{message}");
}

/// `url` with its host `127.0.0.1` spelled `localhost`, so the address is
/// only known after resolution.
fn via_localhost(url: &str) -> String {
    url.replacen("127.0.0.1", "localhost", 1)
}

/// Runs `runs` on an in-process worker with `config` until all are
/// terminal; returns their ids in order.
async fn execute(db: &TestDb, config: WorkerConfig, runs: Vec<CreateRun>) -> Vec<Uuid> {
    let tenant = db.tenant("acme").await;
    let ids = db
        .enqueue(tenant, runs)
        .await
        .into_iter()
        .map(|r| r.id)
        .collect();
    let worker = RunningWorker::start(Worker::new(db.new_pool(4), config));
    db.wait_all_terminal(Duration::from_secs(20)).await;
    worker.stop().await;
    ids
}

/// Without an allow-list, the metadata service, a private address, and a
/// hostname (`localhost`) resolving to a server on this host are all
/// refused, naming host, address and why; the local server receives no
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_steps_to_internal_addresses_are_refused_without_the_allow_list() {
    let db = TestDb::new().await;
    let target = Target::start();
    let local = via_localhost(&target.url);
    let ids = execute(
        &db,
        allowing(&[]),
        vec![
            http_run("http://169.254.169.254/latest/meta-data"),
            http_run("http://10.0.0.1/"),
            http_run(&local),
            http_run(&target.url),
            http_run("http://[::ffff:10.0.0.1]/"),
        ],
    )
    .await;

    assert_refused(
        &db,
        ids[0],
        &[
            "169.254.169.254",
            "cloud metadata",
            "host '169.254.169.254'",
        ],
    )
    .await;
    assert_refused(&db, ids[1], &["10.0.0.1", "private network"]).await;
    assert_refused(&db, ids[2], &["host 'localhost'", "loopback"]).await;
    assert_refused(&db, ids[3], &["127.0.0.1", "loopback"]).await;
    assert_refused(&db, ids[4], &["::ffff:10.0.0.1", "private network"]).await;
    assert!(
        target.seen.all().is_empty(),
        "the local server was called: {:?}",
        target.seen.all()
    );
}

/// With loopback allow-listed (as the test setup and `runq dev` have it),
/// `localhost` goes through, and every other internal address is still
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_allow_list_lets_localhost_through_and_nothing_else() {
    let db = TestDb::new().await;
    let target = Target::start();
    let ids = execute(
        &db,
        allowing(&["127.0.0.0/8", "::1/128"]),
        vec![
            http_run(&via_localhost(&target.url)),
            http_run("http://169.254.169.254/latest/meta-data"),
            http_run("http://10.0.0.1/"),
        ],
    )
    .await;

    let (status, error) = outcome(&db, ids[0]).await;
    assert_eq!(status, "succeeded", "{error}");
    assert_eq!(target.seen.all(), vec![(ids[0], 1)]);
    assert_refused(&db, ids[1], &["169.254.169.254"]).await;
    assert_refused(&db, ids[2], &["10.0.0.1"]).await;
}

#[derive(Deserialize)]
struct To {
    to: String,
}

/// Answers 307 (keep the method and body) to `?to=`.
#[handler]
fn redirect(Query(To { to }): Query<To>, Data(hits): Data<&Arc<AtomicUsize>>) -> Response {
    hits.fetch_add(1, Ordering::SeqCst);
    Response::builder()
        .status(StatusCode::TEMPORARY_REDIRECT)
        .header("location", to)
        .finish()
}

/// A server that redirects every request to its `?to=`, counting them;
/// stopped when dropped.
struct Redirector {
    address: SocketAddr,
    hits: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Redirector {
    /// Serves on a free port of `ip`.
    fn start(ip: IpAddr) -> Self {
        let listener = std::net::TcpListener::bind((ip, 0)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let address = listener.local_addr().expect("address");
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let app = Route::new().at("/", redirect).data(hits.clone());
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).expect("acceptor");
            Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(app, shutdown, Some(Duration::from_millis(10)))
                .await
        });
        Redirector {
            address,
            hits,
            stop,
        }
    }

    /// The URL that redirects to `to`.
    fn to(&self, to: &str) -> String {
        url::Url::parse_with_params(&format!("http://{}/", self.address), [("to", to)])
            .expect("redirect url")
            .to_string()
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Redirector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Redirects are checked hop by hop: an allow-listed loopback server that
/// redirects to a private address or to the metadata service gets the step
/// refused at the redirect; a redirect to another allowed address is
/// followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_internal_addresses_are_refused() {
    let db = TestDb::new().await;
    let target = Target::start();
    let redirector = Redirector::start([127, 0, 0, 1].into());
    let ids = execute(
        &db,
        allowing(&["127.0.0.0/8"]),
        vec![
            http_run(&redirector.to("http://10.0.0.1/")),
            http_run(&redirector.to("http://169.254.169.254/latest/meta-data")),
            http_run(&redirector.to(&target.url)),
        ],
    )
    .await;

    assert_refused(
        &db,
        ids[0],
        &["redirect to 'http://10.0.0.1/'", "private network"],
    )
    .await;
    assert_refused(
        &db,
        ids[1],
        &[
            "redirect to 'http://169.254.169.254/latest/meta-data'",
            "cloud metadata",
        ],
    )
    .await;
    let (status, error) = outcome(&db, ids[2]).await;
    assert_eq!(status, "succeeded", "{error}");
    assert_eq!(redirector.hits(), 3, "each run reached the first hop");
    assert_eq!(target.seen.all(), vec![(ids[2], 1)]);
}

/// A redirect to a hostname is judged on the addresses it resolves to:
/// with only 127.0.0.2 allowed, a server there that redirects to
/// `localhost` (127.0.0.1 and ::1) gets the step refused, and the server on
/// 127.0.0.1 receives nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_hostnames_are_judged_after_resolution() {
    let db = TestDb::new().await;
    let target = Target::start();
    let redirector = Redirector::start([127, 0, 0, 2].into());
    let ids = execute(
        &db,
        allowing(&["127.0.0.2/32"]),
        vec![http_run(&redirector.to(&via_localhost(&target.url)))],
    )
    .await;

    assert_refused(&db, ids[0], &["host 'localhost'", "loopback"]).await;
    assert_eq!(redirector.hits(), 1);
    assert!(target.seen.all().is_empty(), "{:?}", target.seen.all());
}

/// The `runq worker` binary reads `RUNQ_OUTBOUND_ALLOW`: with it empty, a
/// step aimed at `localhost` is refused and the local server is not called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_process_refuses_localhost_without_the_allow_list() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let target = Target::start();
    let runs = db
        .enqueue(tenant, vec![http_run(&via_localhost(&target.url))])
        .await;
    let mut worker = Proc::worker(&db.url, &[("RUNQ_OUTBOUND_ALLOW", "")]);
    db.wait_all_terminal(Duration::from_secs(30)).await;
    worker.stop().await;

    assert_refused(&db, runs[0].id, &["host 'localhost'", "loopback"]).await;
    assert!(target.seen.all().is_empty(), "{:?}", target.seen.all());
}
