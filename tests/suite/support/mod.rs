//! The test harness: one isolated, migrated database per test, cloned from a
//! template so each test starts in milliseconds.
//!
//! The server is found once per test process: `DATABASE_URL` when set, else a
//! Postgres container where a Docker engine answers, else a throwaway cluster
//! started from local binaries under `target/tmp` (shared by concurrent test
//! processes through a file lock, and kept running between runs).

#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use runq_devtools::postgres::{Durability, LocalCluster};
use runq_shared::config::{ApiConfig, WorkerConfig};
use runq_shared::db::{self, MIGRATOR};
use runq_shared::quotas::{Plan, TenantQuotas};
use runq_shared::{CreateRun, NewRun, NewStep, Run, TenantId};
use runq_worker::Worker;
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod handlers;
pub mod http;
pub mod process;
pub mod proxy;
pub mod receiver;
pub mod sse;
pub mod target;

/// Where the test server is: an admin URL (database `postgres` or the one
/// given) that may create databases.
struct Server {
    admin_url: String,
}

static SERVER: OnceLock<Server> = OnceLock::new();

fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return Server { admin_url: url };
        }
        if docker_answers() {
            return Server {
                admin_url: start_container(),
            };
        }
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("runq-test-pg");
        std::fs::create_dir_all(&dir).expect("target/tmp is writable");
        let lock = std::fs::File::create(dir.join("lock")).expect("lock file can be created");
        lock.lock().expect("lock the test cluster directory");
        let cluster = LocalCluster::start(&dir.join("cluster"), Durability::Fast)
            .unwrap_or_else(|err| panic!("no DATABASE_URL, no Docker, and {err}"));
        drop(lock);
        Server {
            admin_url: cluster.url("postgres"),
        }
    })
}

fn docker_answers() -> bool {
    std::process::Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn start_container() -> String {
    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::testcontainers::runners::SyncRunner;
    let container = Postgres::default()
        .with_host_auth()
        .start()
        .expect("start a Postgres container");
    let port = container.get_host_port_ipv4(5432).expect("container port");
    // The container must outlive every test of this process.
    Box::leak(Box::new(container));
    format!("postgres://postgres@127.0.0.1:{port}/postgres")
}

/// The admin URL with another database name.
fn url_for(admin_url: &str, database: &str) -> String {
    let mut url = url::Url::parse(admin_url).expect("the server URL parses");
    url.set_path(&format!("/{database}"));
    url.to_string()
}

/// Name of the template for the current migrations: a change to any
/// migration makes a new template.
fn template_name() -> String {
    let mut hasher = DefaultHasher::new();
    for migration in MIGRATOR.iter() {
        migration.version.hash(&mut hasher);
        migration.checksum.hash(&mut hasher);
    }
    format!("runq_template_{:016x}", hasher.finish())
}

async fn ensure_template(admin: &mut PgConnection, admin_url: &str) -> String {
    let template = template_name();
    // Serialises template creation across concurrent test processes.
    sqlx::query("SELECT pg_advisory_lock(72176)")
        .execute(&mut *admin)
        .await
        .expect("lock");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&template)
            .fetch_one(&mut *admin)
            .await
            .expect("query pg_database");
    if !exists {
        let building = format!("{template}_building");
        sqlx::query(&format!("DROP DATABASE IF EXISTS {building}"))
            .execute(&mut *admin)
            .await
            .expect("drop a half-built template");
        sqlx::query(&format!("CREATE DATABASE {building}"))
            .execute(&mut *admin)
            .await
            .expect("create the template");
        let mut conn = PgConnection::connect(&url_for(admin_url, &building))
            .await
            .expect("connect to the template");
        MIGRATOR.run(&mut conn).await.expect("migrate the template");
        conn.close().await.expect("close the template connection");
        // Published only once complete, so nobody clones a half-migrated one.
        sqlx::query(&format!("ALTER DATABASE {building} RENAME TO {template}"))
            .execute(&mut *admin)
            .await
            .expect("publish the template");
    }
    sqlx::query("SELECT pg_advisory_unlock(72176)")
        .execute(&mut *admin)
        .await
        .expect("unlock");
    template
}

/// A migrated database of this test's own, dropped when the value is.
pub struct TestDb {
    /// A pool on it.
    pub pool: PgPool,
    /// Its URL, for worker processes.
    pub url: String,
    /// Dropped with this value unless it was attached to.
    name: Option<String>,
}

impl TestDb {
    /// A fresh database cloned from the migrated template.
    pub async fn new() -> Self {
        let admin_url = server().admin_url.clone();
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("connect to the test server");
        let template = ensure_template(&mut admin, &admin_url).await;
        let name = format!("runq_test_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .execute(&mut admin)
            .await
            .expect("clone the template");
        admin.close().await.ok();
        let url = url_for(&admin_url, &name);
        let pool = db::pool(&url, 20, Duration::from_secs(10)).expect("pool");
        TestDb {
            pool,
            url,
            name: Some(name),
        }
    }

    /// The database at `url` (migrated by whoever made it), left in place
    /// when dropped.
    pub async fn attach(url: &str) -> Self {
        let pool = db::pool(url, 5, Duration::from_secs(10)).expect("pool");
        db::migrate(&pool).await.expect("migrate");
        TestDb {
            pool,
            url: url.to_owned(),
            name: None,
        }
    }

    /// A separate pool on the same database (another "process" worth of
    /// connections).
    pub fn new_pool(&self, max_connections: u32) -> PgPool {
        db::pool(&self.url, max_connections, Duration::from_secs(10)).expect("pool")
    }

    /// A tenant named `name` on the `unlimited` plan, so tests that are not
    /// about quotas never meet one.
    pub async fn tenant(&self, name: &str) -> TenantId {
        let mut conn = self.pool.acquire().await.expect("connection");
        let tenant = db::tenants::ensure(&mut conn, name).await.expect("tenant");
        db::quotas::set(&mut conn, tenant, &TenantQuotas::plan(Plan::Unlimited))
            .await
            .expect("unlimited plan");
        tenant
    }

    /// A tenant named `name` with no quota settings: on the default plan
    /// (`free`, as no test changes the process's default).
    pub async fn default_plan_tenant(&self, name: &str) -> TenantId {
        let mut conn = self.pool.acquire().await.expect("connection");
        db::tenants::ensure(&mut conn, name).await.expect("tenant")
    }

    /// Inserts `runs` for `tenant` (one transaction) and returns them.
    pub async fn enqueue(&self, tenant: TenantId, runs: Vec<CreateRun>) -> Vec<Run> {
        let mut tx = self.pool.begin().await.expect("begin");
        let new = runs
            .into_iter()
            .map(|run| NewRun {
                tenant_id: tenant,
                idempotency_key: None,
                run,
            })
            .collect();
        let enqueued = db::runs::enqueue_many(&mut tx, new).await.expect("enqueue");
        tx.commit().await.expect("commit");
        enqueued.into_iter().map(|e| e.run).collect()
    }

    /// One scalar from `sql`.
    pub async fn scalar<T>(&self, sql: &str) -> T
    where
        T: Send + Unpin + for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Runs `sql`.
    pub async fn execute(&self, sql: &str) {
        sqlx::query(sql)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Count of runs in `status`.
    pub async fn count_status(&self, status: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM runs WHERE status::text = $1")
            .bind(status)
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// Polls `condition` until it holds; panics with `what` after `limit`.
    pub async fn wait_for<F, Fut>(&self, what: &str, limit: Duration, mut condition: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        wait_for(what, limit, &mut condition).await;
    }

    /// Waits until every run is in a terminal status.
    pub async fn wait_all_terminal(&self, limit: Duration) {
        let pool = self.pool.clone();
        wait_for("every run to finish", limit, &mut || {
            let pool = pool.clone();
            async move {
                let open: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM runs WHERE status IN ('pending', 'running')",
                )
                .fetch_one(&pool)
                .await
                .expect("count");
                open == 0
            }
        })
        .await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.name.clone() else {
            return;
        };
        let admin_url = server().admin_url.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on, so
        // the database is dropped from a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .ok()
            })
        });
        let _ = dropped.join();
    }
}

/// How long every poll in the suite waits before looking again. Tests wait
/// for conditions, never for time: this is the one place they sleep.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// Polls `condition` every [`POLL_EVERY`] until it yields a value and returns
/// it; `None` once `limit` has passed without one. For callers that handle a
/// timeout themselves (killing a process, attaching its log).
pub async fn poll<T, F, Fut>(limit: Duration, mut condition: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = condition().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls `condition` until it holds; panics with `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, condition: &mut F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for_value(what, limit, || {
        let holds = condition();
        async move { holds.await.then_some(()) }
    })
    .await;
}

/// Polls `condition` until it yields a value and returns it; panics with
/// `what` after `limit`.
pub async fn wait_for_value<T, F, Fut>(what: &str, limit: Duration, condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll(limit, condition).await {
        Some(value) => value,
        None => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Checks `invariant` (which asserts) at every poll for `window`: for a
/// property that must hold *throughout* a stretch of activity, where there is
/// no state to wait for, only an absence to watch.
pub async fn holds_throughout<F, Fut>(window: Duration, mut invariant: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let watched = poll(window, || {
        let check = invariant();
        async move {
            check.await;
            None::<()>
        }
    })
    .await;
    debug_assert!(watched.is_none());
}

/// The variable that turns a skipped test into a failure. CI sets it so a
/// machine lacking a tool a test needs fails instead of passing quietly.
pub const STRICT_VAR: &str = "RUNQ_TEST_STRICT";

/// For a test that cannot run here because of `why` (a missing tool): says
/// so on stderr and returns, so the test passes as skipped; panics instead
/// when `RUNQ_TEST_STRICT=1`.
///
/// # Panics
///
/// When `RUNQ_TEST_STRICT=1`.
pub fn skip_or_fail(why: &str) {
    if std::env::var(STRICT_VAR).is_ok_and(|value| value == "1") {
        panic!("{why} ({STRICT_VAR}=1 makes a skip a failure)");
    }
    eprintln!("skipped: {why} (set {STRICT_VAR}=1 to fail instead)");
}

/// Worker settings for tests: quick polls, quick retries, short grace, and
/// loopback allow-listed, as `http` steps call servers the test runs on
/// this host (the default refuses them).
pub fn worker_config(concurrency: usize) -> WorkerConfig {
    WorkerConfig {
        concurrency,
        prefetch: concurrency,
        poll_interval_ms: 50,
        retry_base_ms: 10,
        retry_max_ms: 50,
        maintenance_ms: 100,
        heartbeat_ms: 200,
        shutdown_grace_ms: 5_000,
        outbound_allow: runq_worker::outbound::LOOPBACK.to_vec(),
        ..WorkerConfig::default()
    }
}

/// A worker running in this process with its own pool, stopped by `stop`.
pub struct RunningWorker {
    /// The worker's id (`runs.locked_by`).
    pub id: uuid::Uuid,
    stop: CancellationToken,
    task: JoinHandle<Result<runq_worker::WorkerReport, runq_worker::WorkerError>>,
}

impl RunningWorker {
    /// Starts `worker`.
    pub fn start(worker: Worker) -> Self {
        let stop = CancellationToken::new();
        let id = worker.id();
        let task = tokio::spawn(worker.run(stop.clone()));
        RunningWorker { id, stop, task }
    }

    /// Stops it gracefully and returns its report.
    pub async fn stop(self) -> runq_worker::WorkerReport {
        self.stop.cancel();
        self.task.await.expect("worker task").expect("worker run")
    }
}

/// A one-step echo run.
pub fn echo_run(input: Value) -> CreateRun {
    CreateRun::new(vec![NewStep::new("echo", "echo", input)])
}

/// The API served on a free loopback port, for the duration of the value.
pub struct TestApi {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestApi {
    /// Serves the API on `pool`.
    pub fn start(pool: PgPool, config: ApiConfig) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let task =
            tokio::spawn(
                async move { runq_api::serve_on(listener, pool, &config, shutdown).await },
            );
        TestApi { base, stop, task }
    }

    /// Default API settings (4 MiB body limit).
    pub fn config() -> ApiConfig {
        ApiConfig {
            listen: "127.0.0.1:0".to_owned(),
            max_body_bytes: 4 * 1024 * 1024,
            step_kinds: vec!["double".to_owned()],
            max_events_per_minute: 300,
            max_streams: 1_000,
            max_streams_per_tenant: 50,
            stream_keep_alive_seconds: 15,
        }
    }
}

impl Drop for TestApi {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

/// A token for `tenant`.
pub async fn token(db: &TestDb, tenant: TenantId) -> String {
    let mut conn = db.pool.acquire().await.expect("connection");
    db::tenants::create_token(&mut conn, tenant, "test")
        .await
        .expect("token")
}

/// Checks DESIGN.md's invariants over every run of `db` after a fault:
/// each run has exactly one `run.created` row; its attempt equals its
/// `run.started` rows minus its `run.released` rows (attempts counted right);
/// a terminal run has exactly one terminal outbox row and others none (never
/// completed twice); its last outbox row carries its current status (every
/// state change has its row); nothing is left running without a live lease.
pub async fn check_invariants(db: &TestDb) {
    let violations: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        r#"
        WITH counted AS (
            SELECT r.id, r.status, r.attempt, r.lease_expires_at,
                   count(*) FILTER (WHERE o.event_type = 'run.created') AS created,
                   count(*) FILTER (WHERE o.event_type = 'run.started') AS started,
                   count(*) FILTER (WHERE o.event_type = 'run.released') AS released,
                   count(*) FILTER (WHERE o.event_type IN
                       ('run.succeeded', 'run.failed', 'run.cancelled', 'run.stopped')) AS terminal,
                   (SELECT runq_outbox_event(o2)->'run'->>'status' FROM outbox o2
                     WHERE o2.run_id = r.id ORDER BY o2.id DESC LIMIT 1) AS last_status
            FROM runs r LEFT JOIN outbox o ON o.run_id = r.id
            GROUP BY r.id
        )
        SELECT id, CASE
            WHEN created <> 1 THEN format('%s run.created rows', created)
            WHEN attempt <> started - released
                THEN format('attempt %s but %s started and %s released', attempt, started, released)
            WHEN status IN ('succeeded', 'failed', 'cancelled', 'stopped_quota') AND terminal <> 1
                THEN format('%s terminal rows for a %s run', terminal, status)
            WHEN status IN ('pending', 'running') AND terminal <> 0
                THEN format('%s terminal rows for a %s run', terminal, status)
            WHEN last_status IS DISTINCT FROM status::text
                THEN format('status %s but last outbox row says %s', status, last_status)
            WHEN status = 'running' AND lease_expires_at < now() - interval '1 minute'
                THEN 'running under a long-dead lease'
            END
        FROM counted
        WHERE created <> 1 OR attempt <> started - released
           OR (status IN ('succeeded', 'failed', 'cancelled', 'stopped_quota') AND terminal <> 1)
           OR (status IN ('pending', 'running') AND terminal <> 0)
           OR last_status IS DISTINCT FROM status::text
           OR (status = 'running' AND lease_expires_at < now() - interval '1 minute')
        LIMIT 10
        "#,
    )
    .fetch_all(&db.pool)
    .await
    .expect("invariant query");
    assert!(violations.is_empty(), "invariants violated: {violations:?}");
}

/// The id (`runs.locked_by`) of the worker process `pid` registered in `db`,
/// waiting up to ten seconds for it to register.
pub async fn worker_id_of(db: &TestDb, pid: u32) -> uuid::Uuid {
    wait_for_value(
        &format!("worker process {pid} to register"),
        Duration::from_secs(10),
        || async {
            sqlx::query_scalar(
                "SELECT id FROM workers WHERE pid = $1 ORDER BY started_at DESC LIMIT 1",
            )
            .bind(pid as i32)
            .fetch_optional(&db.pool)
            .await
            .expect("workers")
        },
    )
    .await
}

/// Run `id`'s status (as text) and attempt.
pub async fn status_and_attempt(db: &TestDb, id: uuid::Uuid) -> (String, i32) {
    sqlx::query_as("SELECT status::text, attempt FROM runs WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("run")
}

/// The event types of run `id`'s outbox rows, oldest first.
pub async fn outbox_types(db: &TestDb, id: uuid::Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT event_type FROM outbox WHERE run_id = $1 ORDER BY id")
        .bind(id)
        .fetch_all(&db.pool)
        .await
        .expect("outbox")
}

/// How many runs worker `worker` holds (`running` under its lease).
pub async fn held_by(db: &TestDb, worker: uuid::Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM runs WHERE locked_by = $1 AND status = 'running'")
        .bind(worker)
        .fetch_one(&db.pool)
        .await
        .expect("count held runs")
}
