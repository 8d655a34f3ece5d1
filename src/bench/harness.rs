//! What every phase shares: the library's pool, the API process and an HTTP
//! client for it, the bench tenant, and how to build a bench run.

use std::time::Duration;

use anyhow::{bail, Context};
use runq_devtools::bench_db;
use runq_shared::config::DatabaseArgs;
use runq_shared::{db, CreateRun, NewRun, NewStep, TenantId};
use serde_json::json;
use sqlx::PgPool;

use super::api::ApiProcess;
use super::progress::Progress;
use super::worker::WorkerProcess;
use super::{PROBE_QUEUE, QUEUE};

/// Connections of the library's own pool: ten callers in flight, plus the
/// connection that polls, plus slack.
const LIBRARY_CONNECTIONS: u32 = 16;

/// The shared state of a benchmark.
pub struct Harness {
    /// The pool the library measurements and the bookkeeping queries use
    /// (not the API's, which is its own, as in a real deployment).
    pub pool: PgPool,
    /// The bench tenant.
    pub tenant: TenantId,
    /// The client that drives the API.
    pub client: reqwest::Client,
    /// `http://127.0.0.1:<port>/v1`.
    pub base: String,
    /// `Bearer <token>` of the bench tenant.
    pub authorization: String,
    /// Progress on stderr.
    pub progress: Progress,
    database_url: String,
    database: DatabaseArgs,
    worker_logs: bool,
    api: ApiProcess,
}

impl Harness {
    /// Migrates the database, refuses one that holds other queues' runs,
    /// empties the run tables, creates the bench tenant and a token, and
    /// starts the API process on a loopback port.
    ///
    /// # Errors
    ///
    /// The database is unreachable or holds runs of other queues, or the
    /// API process cannot be started.
    pub async fn start(
        database_url: &str,
        database: &DatabaseArgs,
        worker_logs: bool,
        progress: Progress,
    ) -> anyhow::Result<Self> {
        let acquire_timeout = Duration::from_millis(database.acquire_timeout_ms);
        let pool = db::pool(database_url, LIBRARY_CONNECTIONS, acquire_timeout)
            .context("parsing the database URL")?;
        db::migrate(&pool).await.context("applying migrations")?;
        let mut conn = pool.acquire().await.context("connecting")?;
        if bench_db::runs_outside_queues(&mut conn, &[QUEUE, PROBE_QUEUE])
            .await
            .context("looking for other queues' runs")?
        {
            bail!(
                "the database holds runs outside queues '{QUEUE}' and '{PROBE_QUEUE}'; runq \
                 bench empties the run tables, so give it a database of its own \
                 (--database-url)"
            );
        }
        bench_db::reset(&mut conn)
            .await
            .context("emptying the run tables")?;
        let tenant = unlimited_tenant(&mut conn, "bench").await?;
        let token = db::tenants::create_token(&mut conn, tenant, "bench")
            .await
            .context("creating a token for the bench tenant")?;
        drop(conn);

        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        let api = ApiProcess::start(database_url, database, worker_logs, &client).await?;
        Ok(Self {
            pool,
            tenant,
            client,
            base: format!("http://{}/v1", api.address),
            authorization: format!("Bearer {token}"),
            progress,
            database_url: database_url.to_owned(),
            database: database.clone(),
            worker_logs,
            api,
        })
    }

    /// Empties the run tables.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn reset(&self) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await.context("connecting")?;
        bench_db::reset(&mut conn)
            .await
            .context("emptying the run tables")
    }

    /// Starts a `runq worker` process on the bench queue with `concurrency`
    /// slots and every other setting at its default.
    ///
    /// # Errors
    ///
    /// The process cannot be started.
    pub fn spawn_worker(&self, concurrency: usize) -> anyhow::Result<WorkerProcess> {
        self.spawn_worker_with(&[QUEUE], concurrency, &[])
    }

    /// [`Harness::spawn_worker`] on `queues` with the extra environment
    /// variables `env` (the soak's short retention and prune intervals).
    ///
    /// # Errors
    ///
    /// The process cannot be started.
    pub fn spawn_worker_with(
        &self,
        queues: &[&str],
        concurrency: usize,
        env: &[(String, String)],
    ) -> anyhow::Result<WorkerProcess> {
        WorkerProcess::spawn(
            &self.database_url,
            &self.database,
            queues,
            concurrency,
            self.worker_logs,
            env,
        )
    }

    /// The API process's peak resident set since it started (`VmHWM`), in
    /// bytes; `None` where `/proc` is not there.
    pub fn api_peak_rss_bytes(&self) -> Option<u64> {
        self.api.peak_rss_bytes()
    }

    /// Stops the API process and waits for it to finish its connections.
    ///
    /// # Errors
    ///
    /// The API does not exit in time, or exits unsuccessfully.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.api.stop().await
    }
}

/// Creates tenant `name` if it is missing and puts it on the unlimited
/// plan: benchmarks measure the queue, not the free tier's limits.
///
/// # Errors
///
/// Database errors.
pub async fn unlimited_tenant(
    conn: &mut sqlx::PgConnection,
    name: &str,
) -> anyhow::Result<TenantId> {
    let tenant = db::tenants::ensure(&mut *conn, name)
        .await
        .with_context(|| format!("creating the bench tenant {name}"))?;
    db::quotas::set(
        &mut *conn,
        tenant,
        &runq_shared::quotas::TenantQuotas::plan(runq_shared::quotas::Plan::Unlimited),
    )
    .await
    .with_context(|| format!("making the bench tenant {name} unlimited"))?;
    Ok(tenant)
}

/// The bench run number `i`: one `echo` step with input `{"i": i}`.
pub fn bench_run(i: u64) -> CreateRun {
    bench_run_on(QUEUE, i)
}

/// [`bench_run`] on `queue`.
pub fn bench_run_on(queue: &str, i: u64) -> CreateRun {
    let mut run = CreateRun::new(vec![NewStep::new("echo", "echo", json!({ "i": i }))]);
    run.queue = queue.to_owned();
    run
}

/// [`bench_run`] as the library takes it.
pub fn bench_new_run(tenant: TenantId, i: u64) -> NewRun {
    NewRun {
        tenant_id: tenant,
        idempotency_key: None,
        run: bench_run(i),
    }
}
